//! The spool: where `send` leaves paths when upload cannot take them (no reader on the
//! pipe, or the pipe stays full), and where upload picks them up.
//!
//! One file per `send` call, `<unix-nanos>-<pid>-<random>.paths`, holding lines as on the
//! pipe. It is written under a dot-name, synced, then renamed, so a reader only ever
//! sees whole files; upload deletes a file only after recording its paths.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes `lines` as a new spool file in `dir` (created if missing).
pub fn write(dir: &Path, lines: &[String]) -> io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let name = format!(
        "{nanos}-{}-{:08x}.paths",
        std::process::id(),
        fastrand::u32(..)
    );
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut text = String::new();
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(&name))?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| dir.join(name))
}

/// The complete spool files in `dir`, oldest first (missing dir: none).
pub fn list(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    match fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                let e = e?;
                let name = e.file_name();
                let name = name.to_string_lossy();
                if !name.starts_with('.') && name.ends_with(".paths") {
                    files.push(e.path());
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_files_are_listed_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        assert!(list(&spool).unwrap().is_empty());
        let a = write(&spool, &["/nix/store/a".into()]).unwrap();
        let b = write(&spool, &["/nix/store/b".into(), "/nix/store/c".into()]).unwrap();
        // A half-written file of another sender is not listed.
        fs::write(spool.join(".123-1-0.paths.tmp"), "partial").unwrap();
        assert_eq!(list(&spool).unwrap(), vec![a, b.clone()]);
        assert_eq!(
            fs::read_to_string(b).unwrap(),
            "/nix/store/b\n/nix/store/c\n"
        );
    }
}
