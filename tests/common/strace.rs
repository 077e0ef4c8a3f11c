//! Reading `strace -f -y` logs: what reached the disk in what order.

/// One syscall of an `strace -f -y` log: where it started and ended in the log (line
/// numbers: a call that was interrupted by another thread's has two lines), and the
/// paths it names (an fd's path as `-y` shows it).
#[derive(Debug)]
pub struct Call {
    pub name: String,
    pub start: usize,
    pub end: usize,
    pub paths: Vec<String>,
}

/// The successful calls of an `strace -f -y` log, joining `<unfinished ...>` with
/// `<... resumed>`.
pub fn traced_calls(log: &str) -> Vec<Call> {
    let mut pending: std::collections::HashMap<&str, (usize, String)> = Default::default();
    let mut calls = Vec::new();
    for (i, line) in log.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        let (start, text) = if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            pending.insert(pid, (i, head.to_string()));
            continue;
        } else if rest.starts_with("<... ") {
            let Some((s, head)) = pending.remove(pid) else {
                continue;
            };
            let tail = rest.split_once("resumed>").map_or("", |(_, t)| t);
            (s, format!("{head}{tail}"))
        } else {
            (i, rest.to_string())
        };
        let Some((name, args)) = text.split_once('(') else {
            continue;
        };
        if !text.ends_with("= 0") {
            continue;
        }
        // Quoted paths (rename, link) or fd paths (`7</dir/file>`).
        let mut paths = Vec::new();
        for (n, piece) in args.split('"').enumerate() {
            if n % 2 == 1 {
                paths.push(piece.to_string());
            }
        }
        if let Some((_, fd)) = args.split_once('<') {
            if let Some((p, _)) = fd.split_once('>') {
                paths.push(p.to_string());
            }
        }
        calls.push(Call {
            name: name.to_string(),
            start,
            end: i,
            paths,
        });
    }
    calls
}

/// The rename or link that gave `file` its final name, once its data was fsync'd
/// before it (under any name it had on the way). Panics, naming the file, when it was
/// not.
pub fn named_after_sync<'a>(calls: &'a [Call], file: &str) -> &'a Call {
    let named = |c: &Call, to: &str| {
        (c.name.starts_with("rename") || c.name.starts_with("link"))
            && c.paths.get(1).map(String::as_str) == Some(to)
    };
    let last = calls
        .iter()
        .rposition(|c| named(c, file))
        .unwrap_or_else(|| panic!("{file} was never renamed or linked into place"));
    // Back along the names it had, to an fsync of its data before the renames.
    let (mut name, mut before) = (calls[last].paths[0].clone(), calls[last].start);
    let synced = loop {
        if calls[..last]
            .iter()
            .any(|c| c.name == "fsync" && c.paths.first() == Some(&name) && c.end < before)
        {
            break true;
        }
        match calls
            .iter()
            .rposition(|c| named(c, &name) && c.end < before)
        {
            Some(k) => {
                name = calls[k].paths[0].clone();
                before = calls[k].start;
            }
            None => break false,
        }
    };
    assert!(
        synced,
        "{file}: its data was not fsync'd before it got its name"
    );
    &calls[last]
}
