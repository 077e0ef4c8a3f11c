//! Input: store paths arrive as lines from a FIFO (kept open across senders), stdin or
//! a file, and from files `send` spooled while upload was away. Each read is parsed,
//! recorded as accepted (see [`super::accept`]) and passed on to the batcher.
//!
//! ```text
//! /nix/store/9pc5sns34dywilnljxzmgx3hf9w9p0cf-probe-a      a store path (or a path into one)
//! ./result                                                  resolved through its symlink
//! !finish                                                   (FIFO only) drain and exit
//! ```

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use log::{error, info, warn};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Error, Shared};
use crate::pipe::{self, Frame, LineSplitter};
use crate::resolve;
use crate::spool;
use crate::store_path::{StoreDir, StorePath};

/// Where paths come from.
pub enum Input {
    Stdin,
    File(tokio::fs::File),
    /// Opened read-write so that senders coming and going never cause EOF.
    Fifo(tokio::net::unix::pipe::Receiver),
}

impl Input {
    /// `-` is stdin; a FIFO is kept open; anything else is read to EOF.
    pub async fn open(path: &str) -> Result<Input, Error> {
        if path == "-" {
            return Ok(Input::Stdin);
        }
        let err = |cause| Error::Input {
            path: path.to_string(),
            cause,
        };
        let meta = std::fs::metadata(path).map_err(err)?;
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_fifo() {
            let rx = tokio::net::unix::pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(path)
                .map_err(err)?;
            Ok(Input::Fifo(rx))
        } else {
            Ok(Input::File(tokio::fs::File::open(path).await.map_err(err)?))
        }
    }
}

pub(super) async fn read(
    input: Input,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Vec<StorePath>>,
    drain: CancellationToken,
    input_done: CancellationToken,
) {
    let _done = input_done.drop_guard();
    let mut splitter = LineSplitter::new(pipe::PIPE_BUF);
    let mut buf = vec![0u8; 64 * 1024];
    let mut frames = Vec::new();
    match input {
        Input::Fifo(rx) => loop {
            tokio::select! {
                r = rx.readable() => if let Err(e) = r {
                    error!("reading the input pipe: {e}");
                    break;
                },
                _ = drain.cancelled() => {
                    // Take what senders already wrote, then stop.
                    while let Ok(n) = rx.try_read(&mut buf) {
                        if n == 0 { break; }
                        splitter.push(&buf[..n], &mut frames);
                    }
                    frames.extend(splitter.finish());
                    deliver(&shared, &mut frames, &tx).await;
                    return;
                }
            }
            match rx.try_read(&mut buf) {
                Ok(n) => splitter.push(&buf[..n], &mut frames),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    error!("reading the input pipe: {e}");
                    break;
                }
            }
            if !deliver(&shared, &mut frames, &tx).await {
                return;
            }
        },
        Input::Stdin => read_stream(tokio::io::stdin(), &shared, &tx, &drain, splitter, buf).await,
        Input::File(f) => read_stream(f, &shared, &tx, &drain, splitter, buf).await,
    }
}

async fn read_stream<R: AsyncRead + Unpin>(
    mut r: R,
    shared: &Shared,
    tx: &mpsc::Sender<Vec<StorePath>>,
    drain: &CancellationToken,
    mut splitter: LineSplitter,
    mut buf: Vec<u8>,
) {
    let mut frames = Vec::new();
    loop {
        let n = tokio::select! {
            n = r.read(&mut buf) => n,
            _ = drain.cancelled() => return,
        };
        match n {
            Ok(0) => break,
            Ok(n) => splitter.push(&buf[..n], &mut frames),
            Err(e) => {
                error!("reading input: {e}");
                break;
            }
        }
        if !deliver(shared, &mut frames, tx).await {
            return;
        }
    }
    frames.extend(splitter.finish());
    deliver(shared, &mut frames, tx).await;
}

/// Parses frames into store paths, records them as accepted, and passes them on.
/// Returns false once `!finish` was seen (stop reading) or the daemon stopped.
async fn deliver(
    shared: &Shared,
    frames: &mut Vec<Frame>,
    tx: &mpsc::Sender<Vec<StorePath>>,
) -> bool {
    let (roots, finish) = accept_frames(shared, frames.drain(..), true);
    if !roots.is_empty() {
        shared.journal_accept(&roots).await;
        if tx.send(roots).await.is_err() {
            return false;
        }
    }
    !finish
}

/// What one read of input holds.
#[derive(Debug, Default, PartialEq)]
struct Parsed {
    roots: Vec<StorePath>,
    /// Why each rejected line was rejected, naming it.
    rejected: Vec<String>,
    /// `!finish` was seen (and commands are allowed): stop reading.
    finish: bool,
}

/// Store paths from frames, and what was wrong with the rest. Commands (`!finish`)
/// count only when `commands` is set (not in spool files).
fn parse_frames(
    store_dir: &StoreDir,
    frames: impl Iterator<Item = Frame>,
    commands: bool,
) -> Parsed {
    let mut parsed = Parsed::default();
    for frame in frames {
        let line = match frame {
            Frame::Line(l) => l,
            Frame::TooLong { prefix, len } => {
                parsed.rejected.push(format!(
                    "rejected input line of {len} bytes starting \"{}\": longer than {} bytes",
                    pipe::escape(&prefix),
                    pipe::PIPE_BUF
                ));
                continue;
            }
        };
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        if line == pipe::FINISH && commands {
            parsed.finish = true;
            break;
        }
        if line.starts_with(b"!") {
            parsed.rejected.push(format!(
                "rejected input \"{}\": unknown command",
                pipe::escape(line)
            ));
            continue;
        }
        match resolve::resolve(line, store_dir) {
            Ok(p) => parsed.roots.push(p),
            Err(e) => parsed.rejected.push(format!("rejected {e}")),
        }
    }
    parsed
}

/// Parses frames, reporting and counting what is rejected.
fn accept_frames(
    shared: &Shared,
    frames: impl Iterator<Item = Frame>,
    commands: bool,
) -> (Vec<StorePath>, bool) {
    let parsed = parse_frames(&shared.cfg.store_dir, frames, commands);
    shared
        .stats
        .rejected
        .fetch_add(parsed.rejected.len() as u64, Relaxed);
    for why in &parsed.rejected {
        warn!("{why}");
    }
    (parsed.roots, parsed.finish)
}

const SPOOL_POLL: Duration = Duration::from_secs(1);

/// Picks up what `send` spooled while upload was away: at start, every second, and
/// once more when the input ends. A file is deleted only after its paths are recorded.
pub(super) async fn watch_spool(
    dir: PathBuf,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Vec<StorePath>>,
    input_done: CancellationToken,
) {
    loop {
        let files = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || spool::list(&dir))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        };
        match files {
            Ok(files) => {
                for f in files {
                    let data = match tokio::fs::read(&f).await {
                        Ok(d) => d,
                        Err(e) => {
                            warn!("cannot read spool file {}: {e}", f.display());
                            continue;
                        }
                    };
                    let mut splitter = LineSplitter::new(pipe::PIPE_BUF);
                    let mut frames = Vec::new();
                    splitter.push(&data, &mut frames);
                    frames.extend(splitter.finish());
                    let (roots, _) = accept_frames(&shared, frames.into_iter(), false);
                    info!("picked up {} paths spooled in {}", roots.len(), f.display());
                    if !roots.is_empty() {
                        if !shared.journal_accept(&roots).await {
                            continue; // keep the file: not recorded
                        }
                        if tx.send(roots).await.is_err() {
                            return;
                        }
                    }
                    if let Err(e) = tokio::fs::remove_file(&f).await {
                        warn!("cannot remove spool file {}: {e}", f.display());
                    }
                }
            }
            Err(e) => warn!("cannot list the spool {}: {e}", dir.display()),
        }
        if input_done.is_cancelled() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(SPOOL_POLL) => {}
            _ = input_done.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(text: &[u8]) -> Vec<Frame> {
        let mut splitter = LineSplitter::new(pipe::PIPE_BUF);
        let mut frames = Vec::new();
        splitter.push(text, &mut frames);
        frames.extend(splitter.finish());
        frames
    }

    const A: &str = "/nix/store/9pc5sns34dywilnljxzmgx3hf9w9p0cf-probe-a";
    const B: &str = "/nix/store/n7wsi22m77azhfv9fnlp9vgc2js3xsfz-probe-b";

    #[test]
    fn store_paths_pass_and_bad_lines_are_named() {
        let store = StoreDir::new("/nix/store").unwrap();
        let long = "x".repeat(pipe::PIPE_BUF + 10);
        let input = format!("{A}\n\n  {B}  \n!bogus\n/tmp/not-in-store\n{long}\n");
        let parsed = parse_frames(&store, frames(input.as_bytes()).into_iter(), true);
        let shown: Vec<String> = parsed.roots.iter().map(|p| store.display(p)).collect();
        assert_eq!(shown, vec![A, B]);
        assert!(!parsed.finish);
        assert_eq!(parsed.rejected.len(), 3, "{:?}", parsed.rejected);
        assert!(
            parsed.rejected[0].contains("!bogus") && parsed.rejected[0].contains("unknown command")
        );
        assert!(parsed.rejected[1].contains("/tmp/not-in-store"));
        assert!(parsed.rejected[2].contains(&format!("{} bytes", pipe::PIPE_BUF + 10)));
    }

    #[test]
    fn finish_stops_reading_only_where_commands_are_allowed() {
        let store = StoreDir::new("/nix/store").unwrap();
        let input = format!("{A}\n!finish\n{B}\n");
        let parsed = parse_frames(&store, frames(input.as_bytes()).into_iter(), true);
        assert!(parsed.finish);
        assert_eq!(parsed.roots.len(), 1, "nothing after !finish");
        // A spool file holds paths only: a command there is rejected, not obeyed.
        let parsed = parse_frames(&store, frames(input.as_bytes()).into_iter(), false);
        assert!(!parsed.finish);
        assert_eq!(parsed.roots.len(), 2);
        assert_eq!(parsed.rejected.len(), 1);
    }
}
