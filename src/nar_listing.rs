//! The NAR listing: the `<hash>.ls` file a binary cache keeps beside a narinfo when
//! Nix's `write-nar-listing` is on. It describes the tree inside the NAR, and where
//! each regular file's contents start in the (uncompressed) NAR, so that a reader can
//! list a store path, or fetch one file with a range request, without the whole NAR:
//! ```text
//! {"version":1,"root":{"type":"directory","entries":{
//!   "bin":{"type":"directory","entries":{"hi":{"type":"regular","size":10,"executable":true,"narOffset":400}}},
//!   "link":{"type":"symlink","target":"bin/hi"}}}}
//! ```
//! (one line in the file). Written as Nix 2.8 writes it (`listNar` in
//! src/libstore/nar-accessor.cc, through its own JSON writer in src/libutil/json.cc):
//! keys in that order, `executable` only when true, entries in byte order of their
//! names (the NAR's order), strings with `"` `\` and control characters escaped and
//! every other byte as it is.
//!
//! The walk that writes the NAR ([`crate::nar::dump_listed`]) drives a [`NarListing`]
//! as it goes, so the tree is read once for both.

/// A listing being written, node by node in NAR order.
#[derive(Debug)]
pub struct NarListing {
    out: Vec<u8>,
    /// For each directory open around the current node: whether it has no entry yet.
    first: Vec<bool>,
}

impl Default for NarListing {
    fn default() -> Self {
        NarListing::new()
    }
}

impl NarListing {
    pub fn new() -> NarListing {
        NarListing {
            out: br#"{"version":1,"root":"#.to_vec(),
            first: Vec::new(),
        }
    }

    /// A directory node starts; its entries follow, then [`NarListing::end_directory`].
    pub fn directory(&mut self) {
        self.out
            .extend_from_slice(br#"{"type":"directory","entries":{"#);
        self.first.push(true);
    }

    /// The next entry of the innermost open directory; its node follows.
    pub fn entry(&mut self, name: &[u8]) {
        if let Some(first) = self.first.last_mut() {
            if !std::mem::replace(first, false) {
                self.out.push(b',');
            }
        }
        string(&mut self.out, name);
        self.out.push(b':');
    }

    pub fn end_directory(&mut self) {
        self.first.pop();
        self.out.extend_from_slice(b"}}");
    }

    /// A regular file of `size` bytes whose contents start at `nar_offset` in the NAR.
    pub fn regular(&mut self, size: u64, executable: bool, nar_offset: u64) {
        self.out
            .extend_from_slice(format!(r#"{{"type":"regular","size":{size}"#).as_bytes());
        if executable {
            self.out.extend_from_slice(br#","executable":true"#);
        }
        // Nix leaves out an offset of 0, which no file in a NAR has.
        if nar_offset != 0 {
            self.out
                .extend_from_slice(format!(r#","narOffset":{nar_offset}"#).as_bytes());
        }
        self.out.push(b'}');
    }

    pub fn symlink(&mut self, target: &[u8]) {
        self.out
            .extend_from_slice(br#"{"type":"symlink","target":"#);
        string(&mut self.out, target);
        self.out.push(b'}');
    }

    /// The finished file, once the root node is complete.
    pub fn finish(mut self) -> Vec<u8> {
        debug_assert!(self.first.is_empty(), "a directory is still open");
        self.out.push(b'}');
        self.out
    }
}

/// A JSON string as Nix's writer makes it: bytes of 0x80 and up pass unchanged, so a
/// name that is not UTF-8 stays the same bytes.
fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    for &b in s {
        match b {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', b]),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=31 => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_nix_does() {
        let mut out = Vec::new();
        string(&mut out, b"a\"b\\c\nd\re\tf\x01\x1f\x7f\xc3\xbc\xff");
        assert_eq!(
            out,
            b"\"a\\\"b\\\\c\\nd\\re\\tf\\u0001\\u001f\x7f\xc3\xbc\xff\""
        );
    }

    #[test]
    fn a_tree_of_every_kind_of_node() {
        let mut l = NarListing::new();
        l.directory();
        l.entry(b"empty");
        l.directory();
        l.end_directory();
        l.entry(b"link");
        l.symlink(b"x");
        l.entry(b"x");
        l.regular(3, true, 400);
        l.end_directory();
        let text = String::from_utf8(l.finish()).unwrap();
        assert_eq!(
            text,
            r#"{"version":1,"root":{"type":"directory","entries":{"empty":{"type":"directory","entries":{}},"link":{"type":"symlink","target":"x"},"x":{"type":"regular","size":3,"executable":true,"narOffset":400}}}}"#
        );
        // And it is JSON.
        serde_json::from_str::<serde_json::Value>(&text).unwrap();
    }

    #[test]
    fn a_single_file_as_the_root() {
        let mut l = NarListing::new();
        l.regular(0, false, 96);
        assert_eq!(
            l.finish(),
            br#"{"version":1,"root":{"type":"regular","size":0,"narOffset":96}}"#
        );
    }
}
