//! `send`: hand store paths to a running `upload` through its named pipe, instantly.
//!
//! ```text
//! send -o /run/narpipe.fifo $OUT_PATHS        # from Nix's post-build-hook
//! send -o /run/narpipe.fifo ./result
//! send -o /run/narpipe.fifo --finish          # ask upload to drain and exit
//! ```
//! Never waits longer than --timeout, never creates the pipe, never blocks on a
//! missing reader: a build must not hang on it. No async runtime, no cache client.

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
    #[arg(long, env = "NARPIPE_SEND_TIMEOUT", default_value_t = 5.0)]
    timeout: f64,

    /// After the paths, ask upload to finish its work and exit.
    #[arg(long)]
    finish: bool,

    /// The Nix store directory.
    #[arg(long, env = "NIX_STORE_DIR", default_value = "/nix/store")]
    store_dir: String,

    /// Store paths to upload.
    paths: Vec<String>,
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
        bail!("{shown} is not a named pipe; refusing to write to it");
    }
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

fn run(args: Args) -> Result<bool> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.timeout.max(0.0));
    let store_dir = StoreDir::new(&args.store_dir).context("--store-dir")?;
    let inputs = if args.paths.is_empty() {
        paths_from_env()
    } else {
        args.paths.clone()
    };
    let mut all_valid = true;
    let mut lines: Vec<String> = Vec::new();
    for input in &inputs {
        match resolve_arg(input, &store_dir) {
            Ok(p) => lines.push(store_dir.display(&p)),
            Err(e) => {
                eprintln!("send: skipping {e}");
                all_valid = false;
            }
        }
    }
    if args.finish {
        lines.push(String::from_utf8_lossy(pipe::FINISH).into_owned());
    }
    if lines.is_empty() {
        if inputs.is_empty() {
            eprintln!("send: nothing to send (no PATH arguments, $OUT_PATHS and $DRV_PATH empty)");
        }
        return Ok(all_valid);
    }
    let chunks = pipe::pack(&lines)?;
    let fd = open_pipe(&args.output, deadline)?;
    let shown = args.output.display().to_string();
    for chunk in &chunks {
        write_chunk(&fd, chunk, deadline, &shown)?;
    }
    Ok(all_valid)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("send: {e:#}");
            ExitCode::from(1)
        }
    }
}
