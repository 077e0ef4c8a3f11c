//! Realisations of content-addressed outputs, asked of Nix in batches: path tasks ask
//! for one output each, and the questions of a 50 ms window (at most [`MAX_BATCH`])
//! become one `nix realisation info` call.
//!
//! ```text
//! path task ─(drv, output)─▶ bounded queue ─▶ window ─▶ drop invalid .drvs ─▶ one Nix call
//!     ▲                                                  (nix-store --check-validity)  │
//!     └──────────────── realisations whose outPath is that output ◀────────────────────┘
//! ```
//! A call that fails (a content-addressed output Nix has no realisation for) is split
//! in halves until the derivation that fails it is alone; that one is reported and
//! answered with none. Answers are never errors: a path without its realisation is
//! still a good cache entry, it is only not found by derivation.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::BoxFuture;
use log::warn;
use tokio::sync::{mpsc, oneshot};

use crate::nix::Nix;
use crate::realisation::Realisation;
use crate::store_path::StorePath;

const WINDOW: Duration = Duration::from_millis(50);
const MAX_BATCH: usize = 500;
const QUEUED: usize = 1024;

struct Question {
    drv: StorePath,
    output: StorePath,
    reply: oneshot::Sender<Vec<Realisation>>,
}

/// The way to ask; the batching task ends when this is dropped.
pub(super) struct Realisations {
    tx: mpsc::Sender<Question>,
}

impl Realisations {
    pub(super) fn start(nix: Nix) -> Realisations {
        let (tx, rx) = mpsc::channel(QUEUED);
        tokio::spawn(serve(nix, rx));
        Realisations { tx }
    }

    /// The realisations Nix has whose out path is `output`, an output of `drv`.
    pub(super) async fn of(&self, drv: &StorePath, output: &StorePath) -> Vec<Realisation> {
        let (reply, answer) = oneshot::channel();
        let q = Question {
            drv: drv.clone(),
            output: output.clone(),
            reply,
        };
        if self.tx.send(q).await.is_err() {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }
}

async fn serve(nix: Nix, mut rx: mpsc::Receiver<Question>) {
    while let Some(first) = rx.recv().await {
        let deadline = tokio::time::Instant::now() + WINDOW;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(q)) => batch.push(q),
                Ok(None) | Err(_) => break,
            }
        }
        let mut drvs: Vec<StorePath> = batch.iter().map(|q| q.drv.clone()).collect();
        drvs.sort();
        drvs.dedup();
        let mut by_output: HashMap<StorePath, Vec<Realisation>> = HashMap::new();
        for r in lookup(&nix, drvs).await {
            by_output.entry(r.out_path.clone()).or_default().push(r);
        }
        for q in batch {
            let found = by_output.get(&q.output).cloned().unwrap_or_default();
            let _ = q.reply.send(found);
        }
    }
}

/// Derivations no longer in the store (garbage-collected) are left out first.
async fn lookup(nix: &Nix, drvs: Vec<StorePath>) -> Vec<Realisation> {
    let invalid = match nix.invalid(&drvs).await {
        Ok(i) => i,
        Err(e) => {
            warn!("cannot look up realisations: {e}");
            return Vec::new();
        }
    };
    let valid = drvs.into_iter().filter(|d| !invalid.contains(d)).collect();
    halves(nix, valid).await
}

fn halves(nix: &Nix, mut drvs: Vec<StorePath>) -> BoxFuture<'_, Vec<Realisation>> {
    Box::pin(async move {
        if drvs.is_empty() {
            return Vec::new();
        }
        match nix.realisations(&drvs).await {
            Ok(r) => r,
            Err(e) if drvs.len() == 1 => {
                let drv = nix.store_dir().display(&drvs[0]);
                warn!("no realisations of {drv}: {e}");
                Vec::new()
            }
            Err(_) => {
                let second = drvs.split_off(drvs.len() / 2);
                let mut found = halves(nix, drvs).await;
                found.extend(halves(nix, second).await);
                found
            }
        }
    })
}
