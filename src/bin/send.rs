//! `send`: hand store paths to a running `upload` through its named pipe, instantly.
//!
//! ```text
//! send -o /run/narpipe.fifo $OUT_PATHS        # from Nix's post-build-hook
//! send -o /run/narpipe.fifo ./result
//! send -o /run/narpipe.fifo --finish          # ask upload to drain and exit
//! ```
//! Never waits longer than --timeout, never creates the pipe, never blocks on a
//! missing reader: a build must not hang on it. Nor fail: whenever the pipe cannot
//! take the paths (no reader, the pipe stays full, `-o` is not a pipe at all), they go
//! to a new file in the spool directory, which upload picks up when it runs, and send
//! says so in one warning line and exits 0. If the spool cannot take them either, the
//! warning names the paths not queued; the exit is still 0. Exit 2 is for a command
//! line at fault only: what clap rejects, a bad --store-dir, or a PATH argument that
//! is not (and does not lead into) a store path, after the other paths were sent. An
//! entry of $OUT_PATHS/$DRV_PATH that is no store path is warned about and skipped.
//! No async runtime, no cache client.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use narpipe::pipe;
use narpipe::resolve::resolve_arg;
use narpipe::store_path::StoreDir;
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::{fstat, Mode, SFlag};

/// Send store paths to a running `upload --input PIPE`.
///
/// PATHs default to $OUT_PATHS (space-separated), or $DRV_PATH if that is empty, as
/// Nix sets them for a post-build-hook. Relative paths and symlinks such as ./result
/// are resolved here.
#[derive(Parser, Debug)]
#[command(version, name = "send")]
struct Args {
    /// The named pipe upload reads from.
    #[arg(short, long, env = "NARPIPE_PIPE")]
    output: PathBuf,

    /// Never wait longer than this many seconds for the pipe.
    #[arg(long, env = "NARPIPE_SEND_TIMEOUT", default_value = "5", value_parser = seconds)]
    timeout: Duration,

    /// After the paths, ask upload to finish its work and exit.
    #[arg(long)]
    finish: bool,

    /// The Nix store directory.
    #[arg(long, env = "NIX_STORE_DIR", default_value = "/nix/store")]
    store_dir: String,

    /// Where paths go when upload cannot take them now (upload's STATE_DIR/spool).
    #[arg(
        long,
        env = "NARPIPE_SPOOL_DIR",
        default_value = "/var/lib/narpipe/spool"
    )]
    spool_dir: PathBuf,

    /// Store paths to upload.
    paths: Vec<String>,
}

/// The exit status for a command line at fault, as clap uses for its own usage errors.
const USAGE_ERROR: u8 = 2;

/// A number of seconds: negative means 0; longer than a build could wait is capped, so
/// that no deadline overflows.
fn seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|e| format!("{e}"))?;
    if !secs.is_finite() {
        return Err("not a finite number of seconds".into());
    }
    Ok(Duration::from_secs_f64(
        secs.clamp(0.0, f64::from(u32::MAX)),
    ))
}

/// One line on stderr, which a post-build-hook's output goes to (the build log). A
/// stderr that cannot take it is no reason to fail (eprintln! would panic on EPIPE).
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "send: {line}");
}

fn count(n: usize) -> String {
    if n == 1 {
        "1 path".into()
    } else {
        format!("{n} paths")
    }
}

fn paths_from_env() -> Vec<String> {
    let from = |var: &str| {
        std::env::var(var)
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let out = from("OUT_PATHS");
    if out.is_empty() {
        from("DRV_PATH")
    } else {
        out
    }
}

/// Opens the FIFO for writing without ever blocking: retries while no reader is there.
fn open_pipe(path: &Path, deadline: Instant) -> Result<OwnedFd> {
    let shown = path.display();
    let meta = std::fs::metadata(path)
        .with_context(|| format!("no pipe at {shown} (is `upload --input {shown}` running?)"))?;
    if !meta.file_type().is_fifo() {
        // A configuration error (-o or NARPIPE_PIPE), yet no reason to fail a build.
        bail!("{shown} is not a named pipe (check -o/NARPIPE_PIPE); nothing written to it");
    }
    open_fifo(path, deadline)
}

fn open_fifo(path: &Path, deadline: Instant) -> Result<OwnedFd> {
    let shown = path.display();
    loop {
        let flags = OFlag::O_WRONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        match open(path, flags, Mode::empty()) {
            Ok(fd) => {
                let st = fstat(fd.as_fd()).context("fstat")?;
                if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFIFO {
                    bail!("{shown} is not a named pipe; refusing to write to it");
                }
                return Ok(fd);
            }
            Err(Errno::ENXIO) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(Errno::ENXIO) => {
                bail!("no upload is reading {shown} (waited until the timeout)")
            }
            Err(Errno::EINTR) => {}
            Err(e) => bail!("cannot open {shown}: {e}"),
        }
    }
}

/// Writes one chunk (≤ PIPE_BUF, so all or nothing) waiting for room until `deadline`.
fn write_chunk(fd: &OwnedFd, chunk: &[u8], deadline: Instant, shown: &str) -> Result<()> {
    loop {
        match nix::unistd::write(fd, chunk) {
            Ok(n) if n == chunk.len() => return Ok(()),
            Ok(n) => bail!("short write of {n} of {} bytes to {shown}", chunk.len()),
            Err(Errno::EAGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    bail!("{shown} stayed full until the timeout (is upload stuck?)");
                }
                let ms = left.as_millis().min(i32::MAX as u128) as i32;
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
                match poll(
                    &mut fds,
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
                ) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => bail!("waiting for {shown}: {e}"),
                }
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EPIPE) => bail!("upload stopped reading {shown}"),
            Err(e) => bail!("writing to {shown}: {e}"),
        }
    }
}

/// Writes the chunks; returns how many went through before an error.
fn write_all(
    fd: &OwnedFd,
    chunks: &[Vec<u8>],
    deadline: Instant,
    shown: &str,
) -> (usize, Result<()>) {
    for (i, chunk) in chunks.iter().enumerate() {
        if let Err(e) = write_chunk(fd, chunk, deadline, shown) {
            return (i, Err(e));
        }
    }
    (chunks.len(), Ok(()))
}

/// Leaves the lines the pipe did not take in the spool, for upload to pick up, and says
/// why in one warning. Never fails: when the spool cannot take them either, the warning
/// names them, and the build goes on all the same.
fn spool(args: &Args, lines: &[String], why: &anyhow::Error) {
    let paths: Vec<String> = lines
        .iter()
        .filter(|l| l.as_bytes() != pipe::FINISH)
        .cloned()
        .collect();
    let finish = if paths.len() < lines.len() {
        "; upload was not asked to finish"
    } else {
        ""
    };
    if paths.is_empty() {
        say(&format!("warning: {why:#}{finish}"));
        return;
    }
    match narpipe::spool::write(&args.spool_dir, &paths) {
        Ok(file) => say(&format!(
            "warning: {why:#}; {} spooled to {} for upload to pick up{finish}",
            count(paths.len()),
            file.display()
        )),
        Err(e) => say(&format!(
            "warning: {why:#}; cannot spool into {} either ({e}): {} NOT queued for \
             upload: {}{finish}",
            args.spool_dir.display(),
            count(paths.len()),
            paths.join(" ")
        )),
    }
}

/// Hands `lines` to upload through the pipe, or what it does not take to the spool.
fn deliver(args: &Args, lines: &[String], deadline: Instant) {
    let chunks = match pipe::pack(lines) {
        Ok(chunks) => chunks,
        Err(e) => return spool(args, lines, &e.into()),
    };
    let fd = match open_pipe(&args.output, deadline) {
        Ok(fd) => fd,
        Err(why) => return spool(args, lines, &why),
    };
    let shown = args.output.display().to_string();
    let (sent, result) = write_all(&fd, &chunks, deadline, &shown);
    if let Err(why) = result {
        // Whole chunks are atomic: the lines of the chunks not written are spooled.
        let rest: Vec<String> = chunks[sent..]
            .iter()
            .flat_map(|c| {
                String::from_utf8_lossy(c)
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        spool(args, &rest, &why);
    }
}

/// Sends, spools or warns; returns the exit status: 0, or [`USAGE_ERROR`].
fn run(args: &Args) -> u8 {
    // Capped by the parser: cannot overflow.
    let deadline = Instant::now() + args.timeout;
    let store_dir = match StoreDir::new(&args.store_dir) {
        Ok(dir) => dir,
        Err(e) => {
            say(&format!("error: --store-dir: {e}"));
            return USAGE_ERROR;
        }
    };
    let from_args = !args.paths.is_empty();
    let inputs = if from_args {
        args.paths.clone()
    } else {
        paths_from_env()
    };
    let mut bad_argument = false;
    let mut lines: Vec<String> = Vec::new();
    for input in &inputs {
        match resolve_arg(input, &store_dir) {
            Ok(p) => lines.push(store_dir.display(&p)),
            // A PATH argument is the caller's mistake: exit 2, once the others are sent.
            // $OUT_PATHS and $DRV_PATH come from Nix: that must not fail the build.
            Err(e) if from_args => {
                say(&format!("error: {e}; not sent"));
                bad_argument = true;
            }
            Err(e) => say(&format!("warning: {e}; not sent")),
        }
    }
    if args.finish {
        lines.push(String::from_utf8_lossy(pipe::FINISH).into_owned());
    }
    if lines.is_empty() {
        if inputs.is_empty() {
            say("warning: nothing to send (no PATH arguments, $OUT_PATHS and $DRV_PATH empty)");
        }
    } else {
        deliver(args, &lines, deadline);
    }
    if bad_argument {
        USAGE_ERROR
    } else {
        0
    }
}

fn main() -> ExitCode {
    ExitCode::from(run(&Args::parse()))
}
