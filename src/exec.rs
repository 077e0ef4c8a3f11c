//! `upload exec -- CMD…`: run one command (a `nix build`, a CI script) while uploading
//! everything Nix builds during it, then wait until all of it is in the cache.
//!
//! ```text
//! tmp/pipe              a private FIFO the uploader reads
//! tmp/spool             where send leaves paths if the pipe is full
//! tmp/post-build-hook   #!/bin/sh  send -o tmp/pipe --spool-dir tmp/spool … || true
//! CMD runs with NIX_CONFIG += "post-build-hook = tmp/post-build-hook"
//! ```
//! The hook runs before Nix reports a build done, so when CMD exits every path it built
//! is in the pipe: the uploader is then told to drain, and the run ends when it has.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use crate::daemon::{self, Config, Input, Shutdown, Summary};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Daemon(#[from] daemon::Error),
    /// The join error's text is part of the message, not a `source`.
    #[error("the upload task failed: {0}")]
    Task(String),
}

/// How the run ended.
pub struct Finished {
    /// The command's exit status, or why it could not be started.
    pub command: std::io::Result<ExitStatus>,
    pub summary: Summary,
}

impl Finished {
    /// The command's exit code (128 + signal when killed, 127 when it could not be
    /// run); 1 when the command succeeded but not every path reached the cache.
    pub fn exit_code(&self) -> u8 {
        let code = match &self.command {
            Ok(st) => st
                .code()
                .or_else(|| std::os::unix::process::ExitStatusExt::signal(st).map(|s| 128 + s))
                .unwrap_or(1),
            Err(_) => 127,
        };
        if code == 0 && !self.summary.all_ok() {
            1
        } else {
            code.clamp(0, 255) as u8
        }
    }
}

/// Runs `command` with a post-build-hook that queues what it builds through `send`
/// (the binary at `send`) into an uploader configured by `cfg`. Errors are set-up
/// failures: nothing ran.
pub async fn run(
    mut cfg: Config,
    send: &Path,
    command: &[String],
    shutdown: Shutdown,
) -> Result<Finished, Error> {
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { what, path, source }
    };
    let tmp = tempfile::Builder::new()
        .prefix("narpipe-exec-")
        .tempdir()
        .map_err(io("create a temporary directory in", &std::env::temp_dir()))?;
    let fifo = tmp.path().join("pipe");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
        .map_err(io("create the pipe", &fifo))?;
    let input = Input::open(&fifo.to_string_lossy()).await?;
    let spool = tmp.path().join("spool");
    cfg.spool_dir = Some(spool.clone());
    daemon::prepare(&cfg).await?;
    let hook = tmp.path().join("post-build-hook");
    std::fs::write(&hook, hook_script(send, &fifo, &spool)).map_err(io("write", &hook))?;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))
        .map_err(io("make executable", &hook))?;

    let uploader = tokio::spawn(daemon::run(cfg, input, shutdown.clone()));
    // Nix reads extra settings from NIX_CONFIG, after its configuration files.
    let mut nix_config = std::env::var("NIX_CONFIG").unwrap_or_default();
    nix_config.push_str(&format!("\npost-build-hook = {}\n", hook.display()));
    let status = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .env("NIX_CONFIG", nix_config)
        .status()
        .await;
    // The hook runs before Nix reports a build done, so everything is in the pipe now.
    shutdown.drain.cancel();
    let summary = uploader.await.map_err(|e| Error::Task(e.to_string()))?;
    Ok(Finished {
        command: status,
        summary,
    })
}

/// The hook: queue what Nix just built, and never fail the build.
fn hook_script(send: &Path, fifo: &Path, spool: &Path) -> String {
    format!(
        "#!/bin/sh\n# narpipe exec: queue what Nix just built; never fail the build.\n\
         {send:?} -o {fifo:?} --spool-dir {spool:?} || true\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_quotes_its_paths_and_cannot_fail() {
        let s = hook_script(
            Path::new("/opt/narpipe/bin/send"),
            Path::new("/tmp/a b/pipe"),
            Path::new("/tmp/a b/spool"),
        );
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.contains(
            r#""/opt/narpipe/bin/send" -o "/tmp/a b/pipe" --spool-dir "/tmp/a b/spool""#
        ));
        assert!(s.trim_end().ends_with("|| true"));
    }
}
