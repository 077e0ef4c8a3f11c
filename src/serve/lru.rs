//! Which objects the on-disk cache keeps: least recently used out first, within a
//! byte budget. Bookkeeping only (names and sizes); the caller deletes the files it is
//! told to. Pure: no IO.
//!
//! ```text
//! insert("nar/a.nar.zst", 600)  ─▶ evicted: []                total 600 / 1000
//! touch("nar/a.nar.zst")
//! insert("nar/b.nar.zst", 500)  ─▶ evicted: ["nar/a.nar.zst"] total 500 / 1000
//! ```

use std::collections::{BTreeMap, HashMap};

#[derive(Debug)]
pub struct Lru {
    max: u64,
    total: u64,
    tick: u64,
    entries: HashMap<String, (u64, u64)>,
    /// tick → name, oldest first.
    order: BTreeMap<u64, String>,
}

impl Lru {
    pub fn new(max: u64) -> Lru {
        Lru {
            max,
            total: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// Bytes held.
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Marks `name` as just used; false if it is not held.
    pub fn touch(&mut self, name: &str) -> bool {
        let Some((_, tick)) = self.entries.get_mut(name) else {
            return false;
        };
        self.order.remove(tick);
        self.tick += 1;
        *tick = self.tick;
        self.order.insert(self.tick, name.to_string());
        true
    }

    /// Holds `name` (replacing an entry of that name) and returns what must go to make
    /// room, oldest first. Something bigger than the whole budget is not held (and is
    /// returned itself).
    pub fn insert(&mut self, name: &str, size: u64) -> Vec<String> {
        self.remove(name);
        if size > self.max {
            return vec![name.to_string()];
        }
        let mut evicted = Vec::new();
        while self.total + size > self.max {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some((s, _)) = self.entries.remove(&oldest) {
                self.total -= s;
            }
            evicted.push(oldest);
        }
        self.tick += 1;
        self.entries.insert(name.to_string(), (size, self.tick));
        self.order.insert(self.tick, name.to_string());
        self.total += size;
        evicted
    }

    pub fn remove(&mut self, name: &str) {
        if let Some((size, tick)) = self.entries.remove(name) {
            self.order.remove(&tick);
            self.total -= size;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_goes_first() {
        let mut lru = Lru::new(1000);
        assert!(lru.insert("a", 400).is_empty());
        assert!(lru.insert("b", 400).is_empty());
        assert!(lru.touch("a"));
        // c needs room: b is the least recently used.
        assert_eq!(lru.insert("c", 400), ["b"]);
        assert_eq!(lru.total(), 800);
        assert!(!lru.touch("b"));
        // A big one pushes out both others, oldest first.
        assert_eq!(lru.insert("d", 900), ["a", "c"]);
        assert_eq!((lru.total(), lru.len()), (900, 1));
        // Too big to hold at all.
        assert_eq!(lru.insert("e", 1001), ["e"]);
        assert_eq!(lru.total(), 900);
        // Replacing an entry counts its new size only.
        assert!(lru.insert("d", 100).is_empty());
        assert_eq!(lru.total(), 100);
        lru.remove("d");
        assert!(lru.is_empty());
        assert_eq!(lru.total(), 0);
    }
}
