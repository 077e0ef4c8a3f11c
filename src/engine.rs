//! The NAR engine: makes compressed NARs on a fixed pool of plain threads.
//!
//! ```text
//! async caller ── Engine::nar ──▶ jobs (crossbeam, bounded) ──▶ worker thread = producer
//!                                                               walk, read, NarHash
//!                                                               cut into frames ──▶ frames (crossbeam, bounded)
//!                                  any idle worker, or the producer itself ◀───────┘ compress
//!   NarStream ◀── (tokio mpsc, bounded) ── whoever finished the next frame due: FileHash, send (Outbox)
//! ```
//! The async runtime only moves the finished bytes on; walking, reading, hashing and
//! compressing never run on it, nor on tokio's blocking pool. The pool has a fixed
//! number of threads whatever the number of paths, each owning its compressor context
//! and frame buffers, reused from NAR to NAR.
//!
//! A NAR is cut into frames of a fixed size (zstd 4 MiB, xz [`xz::block_size`]), read from the files
//! straight into one contiguous buffer each. A NAR smaller than a frame is one frame.
//! The frames of a big NAR are compressed by every idle thread at once and joined in
//! order: zstd as independent frames one after another, xz as one stream of blocks
//! (see [`crate::xz`]); both are one ordinary `.zst`/`.xz` file. The thread that
//! finishes the frame due next hashes it into the FileHash and sends it (see
//! [`Outbox`]), so that on a big NAR the producer's NarHash and the FileHash, both
//! sequential, run on two threads side by side. A producer with too many frames not
//! yet sent compresses queued frames itself meanwhile, so no thread idles while any
//! frame waits, and the pool cannot deadlock.
//!
//! A compressed frame that fills at least half its buffer (and every full frame with
//! no compression) travels on in that buffer, without a copy; the buffer comes back to
//! the pool's threads once its bytes are written, to be filled again instead of fresh
//! pages from the kernel. The last frame of a NAR, or its only one, is compressed by
//! its producer: nothing to hand to another thread and wait for. A producer left
//! waiting for frames that other threads are still compressing (an xz block takes
//! seconds) makes queued NARs known to fit in one frame meanwhile, so that they do not
//! wait for a free thread while this one idles (see [`Engine::nar`]).
//!
//! [`Engine::run`] puts other CPU work on the same threads.
//!
//! On request the walk also writes the NAR's listing (see [`crate::nar_listing`]), given
//! back with the digest: the tree is read once for both.
//!
//! Dropping a [`NarStream`] cancels its NAR: the producer and helpers stop at the next
//! frame (xz: the next MiB), and nothing more is sent.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use crossbeam_channel::{self as channel, Receiver, Sender, TryRecvError, TrySendError};
use sha2::Digest;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::compress::Compression;
use crate::hash::Sha256;
use crate::nar;
use crate::nar_listing::NarListing;
use crate::xz;
use crate::zstd_frame::FrameCompressor;

/// Uncompressed bytes per zstd frame (and per chunk when not compressing).
const ZSTD_FRAME: usize = 4 << 20;
/// Frame buffers a thread keeps for reuse.
const SPARE_FRAMES: usize = 2;
/// Pieces in flight from a producer to the async side.
const PIECES_IN_FLIGHT: usize = 4;
/// Compressed frames at least this big (and filling half their buffer) are handed on
/// in the buffer they were compressed into.
const HAND_ON_MIN: usize = 256 << 10;

fn xz_level(level: Option<i32>) -> u32 {
    level.map_or(6, |l| l.clamp(0, 9) as u32)
}

/// The io error's text is part of the message (callers log `{e}`), not a `source`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot archive it: {0}")]
    Archive(io::Error),
    #[error("compressing it failed: {0}")]
    Compress(io::Error),
    #[error("the NAR engine has stopped")]
    Stopped,
    #[error("the work panicked on a NAR thread")]
    Panicked,
}

/// Hashes and sizes of one finished NAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarDigest {
    pub nar_hash: Sha256,
    pub nar_size: u64,
    /// Of the compressed file; equal to the NAR's when not compressing.
    pub file_hash: Sha256,
    pub file_size: u64,
}

/// What a producer sends: the compressed file in order, then its digest (and listing).
enum Piece {
    Data(Bytes),
    End(NarDigest, Option<Vec<u8>>),
}

/// Shared by a NAR's producer, its helpers and its [`NarStream`].
struct Control {
    cancelled: AtomicBool,
}

impl Control {
    fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
}

struct Job {
    path: PathBuf,
    codec: Codec,
    /// Whether to write the NAR's listing too.
    listing: bool,
    control: Arc<Control>,
    out: mpsc::Sender<Result<Piece, Error>>,
    /// Released when the job ends: bounds the jobs queued and running.
    _permit: OwnedSemaphorePermit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Zstd(i32),
    Xz(u32),
    None,
}

impl Codec {
    fn new(compression: Compression, level: Option<i32>) -> Self {
        match compression {
            Compression::Zstd => Codec::Zstd(level.unwrap_or(3)),
            Compression::Xz => Codec::Xz(xz_level(level)),
            Compression::None => Codec::None,
        }
    }

    /// Bytes of NAR per frame.
    fn frame_size(self) -> usize {
        match self {
            Codec::Xz(level) => xz::block_size(level),
            Codec::Zstd(_) | Codec::None => ZSTD_FRAME,
        }
    }
}

/// What a pool thread is given: a NAR to make, or other CPU work (see [`Engine::run`]).
enum Work {
    Nar(Job),
    Call(Box<dyn FnOnce() + Send>),
}

/// One frame of a NAR, to be compressed by whichever thread takes it.
struct Frame {
    data: Vec<u8>,
    len: usize,
    codec: Codec,
    control: Arc<Control>,
    /// Its place in the NAR, counted from 0.
    seq: u64,
    /// Where it goes once compressed; taken then.
    outbox: Option<Arc<Outbox>>,
}

impl Drop for Frame {
    /// A frame dropped before it was compressed (its thread panicked) fails its NAR:
    /// the producer would wait for it forever otherwise.
    fn drop(&mut self) {
        if let Some(outbox) = self.outbox.take() {
            let died = io::Error::other("a compression thread died");
            outbox.complete(self.seq, Err(died), false);
        }
    }
}

/// What a frame compresses to, and for xz what the index needs to know of its block.
type Compressed = (Bytes, Option<xz::BlockRecord>);

/// A NAR's compressed frames on their way to the [`NarStream`]. Frames are compressed
/// in any order, on any thread; whoever finishes the next one due hashes it into the
/// FileHash and sends it, then those that waited behind it. The FileHash, which must
/// see the file in order, thus runs on the threads that compress, not on the producer,
/// which only reads and computes the NarHash: on a big NAR the two hashes, each on one
/// thread, run side by side.
struct Outbox {
    state: Mutex<OutState>,
    out: mpsc::Sender<Result<Piece, Error>>,
    /// Wakes the producer: a frame was sent or failed, or waits for room in `out`.
    wake: Sender<()>,
    /// Whether the file has a hash of its own (not when it is the NAR itself).
    hash_file: bool,
}

#[derive(Default)]
struct OutState {
    /// The next frame to send.
    next: u64,
    /// Frames compressed but not sent: their turn has not come, or `out` was full.
    ready: BTreeMap<u64, Compressed>,
    /// Someone is sending (and holds the hasher meanwhile).
    sending: bool,
    file_hasher: sha2::Sha256,
    file_size: u64,
    xz_records: Vec<xz::BlockRecord>,
    /// Why a frame failed (the first one).
    failed: Option<io::Error>,
    /// The stream was dropped: nothing more to send.
    closed: bool,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutState> {
        // The state is consistent between statements that can panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        // Full: a wake-up is pending already, and the producer looks at the state then.
        let _ = self.wake.try_send(());
    }

    /// Takes frame `seq` compressed (or failed), and sends what is due. `blocking`: the
    /// NAR's own producer, which may wait for room in the stream; another thread only
    /// sends while there is room, and leaves the rest to the producer.
    fn complete(&self, seq: u64, result: io::Result<Compressed>, blocking: bool) {
        match result {
            Ok(c) => {
                self.lock().ready.insert(seq, c);
                self.send_due(blocking);
            }
            Err(e) => {
                self.lock().failed.get_or_insert(e);
                self.wake();
            }
        }
    }

    /// Sends the frames that are due, in order, unless another thread is at it; returns
    /// whether it sent any.
    fn send_due(&self, blocking: bool) -> bool {
        let mut st = self.lock();
        if st.sending || st.closed || st.failed.is_some() || !st.ready.contains_key(&st.next) {
            return false;
        }
        st.sending = true;
        let mut hasher = std::mem::take(&mut st.file_hasher);
        let mut sent = false;
        loop {
            let seq = st.next;
            let Some((bytes, record)) = st.ready.remove(&seq) else {
                break;
            };
            // Room first, so that a frame is hashed only once it surely goes out.
            let permit = if blocking {
                None
            } else {
                match self.out.try_reserve() {
                    Ok(p) => Some(p),
                    Err(mpsc::error::TrySendError::Full(())) => {
                        st.ready.insert(seq, (bytes, record));
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(())) => {
                        st.closed = true;
                        break;
                    }
                }
            };
            drop(st);
            if self.hash_file {
                hasher.update(&bytes);
            }
            let len = bytes.len() as u64;
            let gone = match permit {
                Some(p) => {
                    p.send(Ok(Piece::Data(bytes)));
                    true
                }
                None => self.out.blocking_send(Ok(Piece::Data(bytes))).is_ok(),
            };
            st = self.lock();
            if !gone {
                st.closed = true;
                break;
            }
            st.file_size += len;
            st.xz_records.extend(record);
            st.next += 1;
            sent = true;
        }
        st.file_hasher = hasher;
        st.sending = false;
        let stuck = st.ready.contains_key(&st.next) || st.closed;
        drop(st);
        if sent || stuck {
            self.wake();
        }
        sent
    }

    /// Sends bytes that are no frame (xz's stream header and end) from the producer,
    /// when no frame is under way.
    fn send_raw(&self, bytes: Vec<u8>) -> Result<(), Failure> {
        {
            let mut st = self.lock();
            if self.hash_file {
                st.file_hasher.update(&bytes);
            }
            st.file_size += bytes.len() as u64;
        }
        self.out
            .blocking_send(Ok(Piece::Data(Bytes::from(bytes))))
            .map_err(|_| Failure::Cancelled)
    }
}

/// Output buffers of zstd frames, shared by the pool's threads: a big compressed frame
/// is handed on as it is (no copy), and its buffer comes back here once the bytes have
/// been written, to be filled again without the kernel handing out (and zeroing) fresh
/// pages each time.
#[derive(Clone)]
struct Buffers {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
}

impl Buffers {
    fn new(keep: usize) -> Self {
        let (tx, rx) = channel::bounded(keep);
        Buffers { tx, rx }
    }

    /// A buffer to compress into, empty: a used one if any came back.
    fn take(&self) -> Vec<u8> {
        self.rx.try_recv().unwrap_or_default()
    }

    /// Keeps `buf` for any thread to take, if there is room; else gives it back.
    fn give_back(&self, buf: Vec<u8>) -> Result<(), Vec<u8>> {
        self.tx.try_send(buf).map_err(|e| e.into_inner())
    }

    /// `buf`'s bytes, handed on as they are; the buffer comes back when they are dropped.
    fn hand_on(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Lent {
            buf,
            home: self.tx.clone(),
        })
    }
}

/// A buffer lent out as [`Bytes`]; goes back to [`Buffers`] when dropped (or is freed,
/// when enough are there).
struct Lent {
    buf: Vec<u8>,
    home: Sender<Vec<u8>>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let _ = self.home.try_send(buf);
    }
}

/// The pool. Dropping it lets the threads end once their current work is done.
pub struct Engine {
    jobs: Sender<Work>,
    /// NARs known to fit in one frame: a producer waiting at the end of its NAR makes
    /// these meanwhile (see [`Producer::wait_until_sent`]).
    small: Sender<Work>,
    permits: Arc<Semaphore>,
}

impl Engine {
    /// Starts `threads` worker threads (at least one).
    pub fn new(threads: usize) -> io::Result<Engine> {
        let threads = threads.max(1);
        let (jobs_tx, jobs_rx) = channel::bounded::<Work>(threads);
        let (small_tx, small_rx) = channel::bounded::<Work>(threads);
        let (frames_tx, frames_rx) = channel::bounded::<Frame>(threads);
        let buffers = Buffers::new(threads);
        for i in 0..threads {
            let mut worker = Worker {
                small: small_rx.clone(),
                nested: false,
                frames_tx: frames_tx.clone(),
                frames_rx: frames_rx.clone(),
                zstd: None,
                xz: None,
                spare: Vec::new(),
                scratch: Vec::new(),
                buffers: buffers.clone(),
                threads,
            };
            let jobs_rx = jobs_rx.clone();
            std::thread::Builder::new()
                .name(format!("narpipe-nar-{i}"))
                .spawn(move || worker.run(jobs_rx))?;
        }
        Ok(Engine {
            jobs: jobs_tx,
            small: small_tx,
            permits: Arc::new(Semaphore::new(threads)),
        })
    }

    /// Starts making the NAR of `path` (and, if `listing`, its listing); waits while
    /// every thread has a NAR of its own.
    ///
    /// `nar_size`, when known (the store's database has it), lets a NAR that fits in
    /// one frame be made by a thread that waits at the end of another NAR for frames
    /// other threads compress: it never hands a frame on, nor fills its stream (at most
    /// four pieces), so the NAR it interrupts is held up for one frame's work at most.
    pub async fn nar(
        &self,
        path: PathBuf,
        compression: Compression,
        level: Option<i32>,
        listing: bool,
        nar_size: Option<u64>,
    ) -> Result<NarStream, Error> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Stopped)?;
        let (tx, rx) = mpsc::channel(PIECES_IN_FLIGHT);
        let control = Arc::new(Control {
            cancelled: AtomicBool::new(false),
        });
        let codec = Codec::new(compression, level);
        let job = Job {
            path,
            codec,
            listing,
            control: control.clone(),
            out: tx,
            _permit: permit,
        };
        let queue = match nar_size {
            Some(size) if size <= codec.frame_size() as u64 => &self.small,
            _ => &self.jobs,
        };
        // Never blocks: each queue holds as many jobs as there are permits.
        queue.try_send(Work::Nar(job)).map_err(|_| Error::Stopped)?;
        Ok(NarStream { rx, control })
    }

    /// Runs `f` on a pool thread: CPU work that goes with a NAR but is not one (a
    /// build log to decompress) stays off the async runtime and shares the pool's
    /// bound. Waits while every thread is busy.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Error> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Stopped)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let call = move || {
            let _permit = permit;
            let _ = tx.send(f());
        };
        self.jobs
            .try_send(Work::Call(Box::new(call)))
            .map_err(|_| Error::Stopped)?;
        // A panic drops the sender; the thread itself goes on (see Worker::guarded).
        rx.await.map_err(|_| Error::Panicked)
    }
}

/// The compressed NAR as it is made. Dropping it cancels the rest.
pub struct NarStream {
    rx: mpsc::Receiver<Result<Piece, Error>>,
    control: Arc<Control>,
}

/// What [`NarStream::next`] gives.
pub enum Next {
    Data(Bytes),
    /// The digest, and the listing if it was asked for.
    End(NarDigest, Option<Vec<u8>>),
}

impl NarStream {
    /// The next piece of the compressed file, or the digest once it is all there.
    pub async fn next(&mut self) -> Result<Next, Error> {
        match self.rx.recv().await {
            Some(Ok(Piece::Data(b))) => Ok(Next::Data(b)),
            Some(Ok(Piece::End(d, l))) => Ok(Next::End(d, l)),
            Some(Err(e)) => Err(e),
            None => Err(Error::Stopped),
        }
    }
}

impl Drop for NarStream {
    fn drop(&mut self) {
        self.control.cancelled.store(true, Ordering::Relaxed);
    }
}

/// A pool thread with its contexts, reused from NAR to NAR.
struct Worker {
    /// NARs known to fit in one frame (see [`Engine::nar`]).
    small: Receiver<Work>,
    /// Making a NAR inside another's last wait: no more nesting then.
    nested: bool,
    frames_tx: Sender<Frame>,
    frames_rx: Receiver<Frame>,
    zstd: Option<(i32, FrameCompressor)>,
    xz: Option<(u32, xz::BlockCompressor)>,
    /// Frame buffers, full length, ready to be filled again.
    spare: Vec<Vec<u8>>,
    /// Where zstd compresses to.
    scratch: Vec<u8>,
    buffers: Buffers,
    /// Threads in the pool.
    threads: usize,
}

impl Worker {
    fn run(&mut self, jobs: Receiver<Work>) {
        let small = self.small.clone();
        loop {
            // Finish frames already cut before starting a new NAR: less memory held.
            match self.frames_rx.try_recv() {
                Ok(frame) => {
                    self.guarded(|w| w.help(frame));
                    continue;
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => return,
            }
            channel::select! {
                recv(self.frames_rx) -> frame => match frame {
                    Ok(frame) => self.guarded(|w| w.help(frame)),
                    Err(_) => return,
                },
                recv(jobs) -> work => match work {
                    Ok(work) => self.work(work),
                    Err(_) => return,
                },
                recv(small) -> work => match work {
                    Ok(work) => self.work(work),
                    Err(_) => return,
                },
            }
        }
    }

    fn work(&mut self, work: Work) {
        match work {
            Work::Nar(job) => self.guarded(|w| w.produce(job)),
            Work::Call(f) => self.guarded(|_| f()),
        }
    }

    /// Runs `f`; a panic is logged and the thread goes on with fresh contexts, so the
    /// pool keeps its size (whoever waited on that work sees it fail).
    fn guarded(&mut self, f: impl FnOnce(&mut Worker)) {
        let run = std::panic::AssertUnwindSafe(|| f(self));
        if std::panic::catch_unwind(run).is_err() {
            log::error!("a NAR thread panicked; its NAR failed, the thread goes on");
            self.zstd = None;
            self.xz = None;
            self.spare.clear();
        }
    }

    /// Compresses a frame (of any NAR) and passes it on.
    fn help(&mut self, mut frame: Frame) {
        let data = std::mem::take(&mut frame.data);
        let output = self.compress(&data[..frame.len], frame.codec, &frame.control);
        self.recycle(data);
        if let Some(outbox) = frame.outbox.take() {
            outbox.complete(frame.seq, output, false);
        }
    }

    fn compress(&mut self, data: &[u8], codec: Codec, control: &Control) -> io::Result<Compressed> {
        if control.cancelled() {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
        }
        self.compress_frame(data, codec, control)
    }

    fn compress_frame(
        &mut self,
        data: &[u8],
        codec: Codec,
        control: &Control,
    ) -> io::Result<Compressed> {
        match codec {
            Codec::Zstd(level) => {
                if self.zstd.as_ref().map(|(l, _)| *l) != Some(level) {
                    self.zstd = Some((level, FrameCompressor::new(level)?));
                }
                let (_, c) = self.zstd.as_mut().expect("just set");
                self.scratch.clear();
                c.compress(data, &mut self.scratch)?;
                // A frame that filled at least half its buffer travels on in it (the
                // thread takes another); a smaller one is copied out at its exact size,
                // so that what travels never holds more than twice its bytes.
                let out = &self.scratch;
                if out.len() >= HAND_ON_MIN && out.len() >= out.capacity() / 2 {
                    let next = self.buffers.take();
                    let full = std::mem::replace(&mut self.scratch, next);
                    Ok((self.buffers.hand_on(full), None))
                } else {
                    Ok((Bytes::copy_from_slice(out), None))
                }
            }
            Codec::Xz(level) => {
                if self.xz.as_ref().map(|(l, _)| *l) != Some(level) {
                    self.xz = Some((level, xz::BlockCompressor::new(level)));
                }
                let (_, c) = self.xz.as_mut().expect("just set");
                let mut out = Vec::new();
                let record = c.compress(data, &mut out, &|| control.cancelled())?;
                Ok((Bytes::from(out), Some(record)))
            }
            Codec::None => Ok((Bytes::copy_from_slice(data), None)),
        }
    }

    /// Frames of a NAR cut and not yet sent, at most, before its producer waits (and
    /// compresses meanwhile): enough for every thread to have one and the producer to
    /// read ahead; xz's frames are 4 times bigger and take seconds each, so fewer.
    fn in_flight(&self, codec: Codec) -> u64 {
        let n = match codec {
            Codec::Xz(_) => self.threads.max(2),
            Codec::Zstd(_) | Codec::None => self.threads.max(2),
        };
        n as u64
    }

    /// Keeps a frame buffer for the next frame, or frees it: a thread holds at most
    /// [`SPARE_FRAMES`], enough for small NARs to reuse one buffer each time, while a
    /// big NAR's extra buffers (16 MiB each with xz) are not held after it.
    fn keep_spare(&mut self, buf: Vec<u8>) {
        if self.spare.len() < SPARE_FRAMES && !buf.is_empty() {
            self.spare.push(buf);
        }
    }

    /// Keeps the buffer of a frame compressed here, which its producer (most often
    /// another thread) is short of now: for any thread to take, else as a spare (xz's
    /// big ones only as a spare).
    fn recycle(&mut self, buf: Vec<u8>) {
        if buf.capacity() > 2 * ZSTD_FRAME {
            self.keep_spare(buf);
        } else if let Err(buf) = self.buffers.give_back(buf) {
            self.keep_spare(buf);
        }
    }

    fn frame_buffer(&mut self, size: usize) -> Vec<u8> {
        let mut b = match self.spare.pop() {
            Some(b) => b,
            // One that was handed on and came back: refilling it costs less than
            // fresh pages.
            None => self.buffers.take(),
        };
        if b.len() < size {
            b.resize(size, 0);
        }
        b
    }

    fn produce(&mut self, job: Job) {
        if job.control.cancelled() {
            return;
        }
        let size = job.codec.frame_size();
        let buf = self.frame_buffer(size);
        let (wake_tx, wake_rx) = channel::bounded(1);
        let outbox = Arc::new(Outbox {
            state: Mutex::default(),
            out: job.out.clone(),
            wake: wake_tx,
            hash_file: job.codec != Codec::None,
        });
        let mut p = Producer {
            worker: self,
            job: &job,
            buf,
            fill: 0,
            size,
            outbox: outbox.clone(),
            wake: wake_rx,
            cut: 0,
            nar_hasher: sha2::Sha256::new(),
            nar_size: 0,
            stopped: None,
        };
        let result = p.run();
        let buf = std::mem::take(&mut p.buf);
        drop(p);
        if result.is_err() {
            // Helpers skip this NAR's frames still queued, and send nothing more.
            job.control.cancelled.store(true, Ordering::Relaxed);
            outbox.lock().closed = true;
        }
        self.keep_spare(buf);
        match result {
            Ok((digest, listing)) => {
                let _ = job.out.blocking_send(Ok(Piece::End(digest, listing)));
            }
            Err(Failure::Cancelled) => {}
            Err(Failure::Failed(e)) => {
                let _ = job.out.blocking_send(Err(e));
            }
        }
    }
}

enum Failure {
    /// The caller went away: nothing more to say.
    Cancelled,
    Failed(Error),
}

/// Makes one NAR on the thread that took its job: walks it, computes the NarHash and
/// cuts it into frames, which any thread compresses (see [`Outbox`]).
struct Producer<'a> {
    worker: &'a mut Worker,
    job: &'a Job,
    /// The frame being filled: full length, `fill` bytes used.
    buf: Vec<u8>,
    fill: usize,
    size: usize,
    outbox: Arc<Outbox>,
    wake: Receiver<()>,
    /// Frames cut so far.
    cut: u64,
    nar_hasher: sha2::Sha256,
    nar_size: u64,
    /// Why the walk was stopped from inside the sink, when it was not the walk's fault.
    stopped: Option<Failure>,
}

impl Producer<'_> {
    fn run(&mut self) -> Result<(NarDigest, Option<Vec<u8>>), Failure> {
        if let Codec::Xz(_) = self.job.codec {
            self.outbox.send_raw(xz::stream_header().to_vec())?;
        }
        let path = self.job.path.clone();
        let mut listing = self.job.listing.then(NarListing::new);
        let walked = match &mut listing {
            Some(l) => nar::dump_listed(&path, self, l),
            None => nar::dump_into(&path, self),
        };
        let walked = walked.and_then(|()| match self.fill {
            0 => Ok(()),
            _ => self.cut_frame(true),
        });
        if let Err(e) = walked {
            // Stopped from inside the sink (cancelled, or a frame failed), or the walk failed.
            return Err(match self.stopped.take() {
                Some(f) => f,
                None if self.job.control.cancelled() => Failure::Cancelled,
                None => Failure::Failed(Error::Archive(e)),
            });
        }
        // Every frame cut: the buffer is free for whatever this thread does meanwhile.
        let buf = std::mem::take(&mut self.buf);
        self.worker.keep_spare(buf);
        // Every frame sent.
        self.wait_until_sent(0)?;
        let (mut file_hasher, mut file_size, records) = {
            let mut st = self.outbox.lock();
            (
                std::mem::take(&mut st.file_hasher),
                st.file_size,
                std::mem::take(&mut st.xz_records),
            )
        };
        if let Codec::Xz(_) = self.job.codec {
            let end = xz::stream_end(&records);
            file_hasher.update(&end);
            file_size += end.len() as u64;
            self.job
                .out
                .blocking_send(Ok(Piece::Data(Bytes::from(end))))
                .map_err(|_| Failure::Cancelled)?;
        }
        let nar_hash = Sha256(std::mem::take(&mut self.nar_hasher).finalize().into());
        let file_hash = match self.job.codec {
            Codec::None => nar_hash,
            _ => Sha256(file_hasher.finalize().into()),
        };
        let digest = NarDigest {
            nar_hash,
            nar_size: self.nar_size,
            file_hash,
            file_size,
        };
        Ok((digest, listing.map(NarListing::finish)))
    }

    /// Keeps `f` for [`Producer::run`] and stops the walk.
    fn stop(&mut self, f: Failure) -> io::Error {
        self.stopped = Some(f);
        io::Error::new(io::ErrorKind::Interrupted, "stopped")
    }

    /// Why the NAR cannot go on, if it cannot.
    fn failure(&self, st: &OutState) -> Option<Failure> {
        if st.closed || self.job.control.cancelled() {
            Some(Failure::Cancelled)
        } else {
            st.failed
                .as_ref()
                .map(|e| Failure::Failed(Error::Compress(io::Error::new(e.kind(), e.to_string()))))
        }
    }

    /// Waits until at most `left` of the frames cut are not sent yet, compressing
    /// queued frames (any NAR's) meanwhile, and sending this NAR's frames when they
    /// wait for room in the stream.
    ///
    /// The last wait (`left` 0: the NAR is cut and its last frame compressed) is for
    /// frames other threads are compressing, an xz block for seconds. Meanwhile this
    /// thread also makes queued NARs known to fit in one frame (see [`Engine::nar`]),
    /// rather than leave a core idle while they wait for a free thread; not from inside
    /// one of those. Each holds this NAR's end up for one frame's work at most, and
    /// this NAR's frames that come back compressed go out meanwhile while its stream
    /// has room.
    fn wait_until_sent(&mut self, left: u64) -> Result<(), Failure> {
        let mut small = if left == 0 && !self.worker.nested {
            self.worker.small.clone()
        } else {
            channel::never()
        };
        loop {
            {
                let st = self.outbox.lock();
                if let Some(f) = self.failure(&st) {
                    return Err(f);
                }
                if self.cut - st.next <= left {
                    return Ok(());
                }
            }
            if self.outbox.send_due(true) {
                continue;
            }
            // Queued frames first, as in Worker::run.
            if let Ok(f) = self.worker.frames_rx.try_recv() {
                self.worker.help(f);
                continue;
            }
            channel::select! {
                recv(self.wake) -> _ => {}
                recv(self.worker.frames_rx) -> f => {
                    if let Ok(f) = f {
                        self.worker.help(f);
                    }
                }
                recv(small) -> work => match work {
                    Ok(work) => {
                        self.worker.nested = true;
                        self.worker.work(work);
                        self.worker.nested = false;
                    }
                    // The engine is gone: stop looking (a closed channel is always ready).
                    Err(_) => small = channel::never(),
                },
            }
        }
    }

    /// Ends the current frame: hashes it and has it compressed. The last one (`last`)
    /// is compressed here: the producer would only wait for it otherwise, and a NAR of
    /// one frame (most of them) never leaves its thread.
    fn cut_frame(&mut self, last: bool) -> io::Result<()> {
        if self.job.control.cancelled() {
            return Err(self.stop(Failure::Cancelled));
        }
        let len = std::mem::take(&mut self.fill);
        self.nar_hasher.update(&self.buf[..len]);
        self.nar_size += len as u64;
        let seq = self.cut;
        self.cut += 1;
        if self.job.codec == Codec::None {
            // Nothing to compress: a full frame travels on in its buffer (the producer
            // takes another), a small one is copied out.
            let bytes = if len >= HAND_ON_MIN && len >= self.size / 2 {
                let next = self.worker.frame_buffer(self.size);
                let mut full = std::mem::replace(&mut self.buf, next);
                full.truncate(len);
                self.worker.buffers.hand_on(full)
            } else {
                Bytes::copy_from_slice(&self.buf[..len])
            };
            self.outbox.complete(seq, Ok((bytes, None)), true);
            return self.check();
        }
        // Room for this frame: at most `in_flight` cut and not yet sent.
        let in_flight = self.worker.in_flight(self.job.codec);
        if let Err(f) = self.wait_until_sent(in_flight) {
            return Err(self.stop(f));
        }
        if last {
            let output = self
                .worker
                .compress(&self.buf[..len], self.job.codec, &self.job.control);
            self.outbox.complete(seq, output, true);
            return self.check();
        }
        let next = self.worker.frame_buffer(self.size);
        let data = std::mem::replace(&mut self.buf, next);
        let frame = Frame {
            data,
            len,
            codec: self.job.codec,
            control: self.job.control.clone(),
            seq,
            outbox: Some(self.outbox.clone()),
        };
        if let Err(TrySendError::Full(f) | TrySendError::Disconnected(f)) =
            self.worker.frames_tx.try_send(frame)
        {
            // Every thread is busy: compress it here.
            self.worker.help(f);
            self.outbox.send_due(true);
        }
        self.check()
    }

    /// Stops the walk if the NAR cannot go on.
    fn check(&mut self) -> io::Result<()> {
        let failure = self.failure(&self.outbox.lock());
        match failure {
            Some(f) => Err(self.stop(f)),
            None => Ok(()),
        }
    }
}

impl nar::Sink for Producer<'_> {
    fn put(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.fill == self.size {
                self.cut_frame(false)?;
            }
            let n = bytes.len().min(self.size - self.fill);
            self.buf[self.fill..self.fill + n].copy_from_slice(&bytes[..n]);
            self.fill += n;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    fn put_from(&mut self, file: &mut File, max: u64) -> io::Result<(usize, nar::Tail)> {
        if self.fill == self.size {
            self.cut_frame(false)?;
        }
        let (n, tail) = nar::read_some(file, &mut self.buf[self.fill..self.size], max)?;
        self.fill += n;
        Ok((n, tail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A tree whose NAR spans `mb` MiB of half-compressible data, and its NAR.
    fn tree(dir: &std::path::Path, mb: usize) -> (PathBuf, Vec<u8>) {
        let root = dir.join("t");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut data = vec![0u8; mb << 20];
        for (i, b) in data.iter_mut().enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = if (i >> 12) % 2 == 0 {
                x as u8
            } else {
                (i % 61) as u8
            };
        }
        std::fs::write(root.join("sub/big"), &data).unwrap();
        std::fs::write(root.join("small"), b"hello").unwrap();
        std::os::unix::fs::symlink("small", root.join("link")).unwrap();
        let mut nar = Vec::new();
        nar::dump(&root, &mut nar).unwrap();
        (root, nar)
    }

    async fn collect(engine: &Engine, path: PathBuf, c: Compression) -> (Vec<u8>, NarDigest) {
        let mut s = engine.nar(path, c, None, false, None).await.unwrap();
        drain(&mut s, Vec::new()).await
    }

    /// The rest of `s`'s file, after `out`, and its digest.
    async fn drain(s: &mut NarStream, mut out: Vec<u8>) -> (Vec<u8>, NarDigest) {
        loop {
            match s.next().await.unwrap() {
                Next::Data(b) => out.extend_from_slice(&b),
                Next::End(d, l) => {
                    assert!(l.is_none(), "a listing nobody asked for");
                    return (out, d);
                }
            }
        }
    }

    fn check_digest(nar: &[u8], file: &[u8], d: &NarDigest) {
        assert_eq!(d.nar_size, nar.len() as u64);
        assert_eq!(d.nar_hash, Sha256(sha2::Sha256::digest(nar).into()));
        assert_eq!(d.file_size, file.len() as u64);
        assert_eq!(d.file_hash, Sha256(sha2::Sha256::digest(file).into()));
    }

    fn zstd_frames(mut file: &[u8]) -> usize {
        let mut n = 0;
        while !file.is_empty() {
            let len = zstd::zstd_safe::find_frame_compressed_size(file).unwrap();
            file = &file[len..];
            n += 1;
        }
        n
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn zstd_big_nar_is_independent_frames_that_decode_back() {
        let dir = tempfile::tempdir().unwrap();
        let (root, nar) = tree(dir.path(), 10);
        let engine = Engine::new(2).unwrap();
        let (file, d) = collect(&engine, root, Compression::Zstd).await;
        check_digest(&nar, &file, &d);
        assert_eq!(zstd_frames(&file), nar.len().div_ceil(ZSTD_FRAME));
        assert!(zstd_frames(&file) >= 3);
        let back = zstd::stream::decode_all(&file[..]).unwrap();
        assert!(back == nar, "decoded NAR differs");
        assert!(
            file.len() < nar.len() * 3 / 4,
            "{} of {}",
            file.len(),
            nar.len()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_nars_stay_one_frame() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"small").unwrap();
        let mut nar = Vec::new();
        nar::dump(&dir.path().join("f"), &mut nar).unwrap();
        let engine = Engine::new(2).unwrap();
        let (file, d) = collect(&engine, dir.path().join("f"), Compression::Zstd).await;
        check_digest(&nar, &file, &d);
        assert_eq!(zstd_frames(&file), 1);
        let (file, d) = collect(&engine, dir.path().join("f"), Compression::None).await;
        assert_eq!(file, nar);
        assert_eq!(d.file_hash, d.nar_hash);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn xz_big_nar_is_one_stream_of_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let (root, nar) = tree(dir.path(), 9);
        let engine = Engine::new(2).unwrap();
        let mut s = engine
            .nar(root, Compression::Xz, Some(0), false, None)
            .await
            .unwrap();
        let (file, d) = drain(&mut s, Vec::new()).await;
        check_digest(&nar, &file, &d);
        // A plain (not concatenated) decoder reads all of it: one stream.
        let mut back = Vec::new();
        liblzma::read::XzDecoder::new(&file[..])
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == nar, "decoded NAR differs");
        // Blocks are counted in the index; the footer's backward size leads to it.
        let backward = u32::from_le_bytes(file[file.len() - 8..file.len() - 4].try_into().unwrap());
        let index = file.len() - 12 - (backward as usize + 1) * 4;
        let blocks = file[index + 1] as usize;
        assert_eq!(blocks, nar.len().div_ceil(xz::block_size(0)));
        assert!(blocks >= 2, "{blocks} blocks");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_listing_comes_with_the_digest_and_points_into_the_nar() {
        let dir = tempfile::tempdir().unwrap();
        let (root, nar) = tree(dir.path(), 9);
        let engine = Engine::new(2).unwrap();
        let mut s = engine
            .nar(root.clone(), Compression::Zstd, None, true, None)
            .await
            .unwrap();
        let listing = loop {
            match s.next().await.unwrap() {
                Next::Data(_) => {}
                Next::End(_, l) => break l.expect("a listing"),
            }
        };
        let want = nar::dump_with_listing(&root, &mut std::io::sink()).unwrap();
        assert_eq!(listing, want);
        // The big file's contents span frames; its offset is in the whole NAR.
        let v: serde_json::Value = serde_json::from_slice(&listing).unwrap();
        let big = &v["root"]["entries"]["sub"]["entries"]["big"];
        let (off, size) = (
            big["narOffset"].as_u64().unwrap() as usize,
            big["size"].as_u64().unwrap() as usize,
        );
        assert_eq!(size, 9 << 20);
        let data = std::fs::read(root.join("sub/big")).unwrap();
        assert!(nar[off..off + size] == data[..], "narOffset {off} is wrong");
    }

    async fn pieces(engine: &Engine, path: PathBuf, c: Compression) -> (Vec<Bytes>, NarDigest) {
        let mut s = engine.nar(path, c, None, false, None).await.unwrap();
        let mut out = Vec::new();
        loop {
            match s.next().await.unwrap() {
                Next::Data(b) => out.push(b),
                Next::End(d, _) => return (out, d),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn buffers_handed_on_are_not_reused_while_held() {
        // Incompressible: every zstd frame fills its buffer and travels on in it; with
        // none, every full frame does.
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 9 << 20];
        fastrand::Rng::with_seed(7).fill(&mut data);
        std::fs::write(dir.path().join("f"), &data).unwrap();
        let mut nar = Vec::new();
        nar::dump(&dir.path().join("f"), &mut nar).unwrap();
        let engine = Engine::new(2).unwrap();
        let mut held: Vec<(Vec<Bytes>, Vec<u8>, Compression)> = Vec::new();
        for round in 0..3 {
            for c in [Compression::Zstd, Compression::None] {
                let (p, d) = pieces(&engine, dir.path().join("f"), c).await;
                let file = p.concat();
                check_digest(&nar, &file, &d);
                held.push((p, file, c));
            }
            // What earlier rounds gave is still intact while held: its buffers were
            // not taken for this round's frames.
            for (p, file, c) in &held {
                assert!(p.concat() == *file, "round {round}: {c} pieces changed");
            }
            // Dropping them sends their buffers back for the next round.
            if round == 1 {
                held.clear();
            }
        }
        for (p, _, c) in &held {
            let file = p.concat();
            let back = match c {
                Compression::Zstd => zstd::stream::decode_all(&file[..]).unwrap(),
                _ => file,
            };
            assert!(back == nar, "{c}: decoded NAR differs");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_reader_gets_every_frame_in_order() {
        // The stream fills up: threads that finish frames leave them to the producer,
        // which sends them in order once there is room.
        let dir = tempfile::tempdir().unwrap();
        let (root, nar) = tree(dir.path(), 30);
        let engine = Engine::new(3).unwrap();
        for c in [Compression::Zstd, Compression::None] {
            let mut s = engine
                .nar(root.clone(), c, None, false, None)
                .await
                .unwrap();
            let mut file = Vec::new();
            let d = loop {
                match s.next().await.unwrap() {
                    Next::Data(b) => {
                        file.extend_from_slice(&b);
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    Next::End(d, _) => break d,
                }
            };
            check_digest(&nar, &file, &d);
            let back = match c {
                Compression::Zstd => zstd::stream::decode_all(&file[..]).unwrap(),
                _ => file,
            };
            assert!(back == nar, "{c}: decoded NAR differs");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_big_nars_at_once_on_few_threads_all_finish() {
        let dir = tempfile::tempdir().unwrap();
        let (root, nar) = tree(dir.path(), 9);
        let engine = Arc::new(Engine::new(2).unwrap());
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..6 {
            let (engine, root) = (engine.clone(), root.clone());
            let c = [Compression::Zstd, Compression::None][i % 2];
            tasks.spawn(async move { collect(&engine, root, c).await });
        }
        while let Some(r) = tasks.join_next().await {
            let (_, d) = r.unwrap();
            assert_eq!(d.nar_size, nar.len() as u64);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_stream_stops_and_frees_its_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (root, nar) = tree(dir.path(), 12);
        let engine = Engine::new(1).unwrap();
        let mut s = engine
            .nar(root.clone(), Compression::Xz, None, false, None)
            .await
            .unwrap();
        // Take the first piece (the stream header), then walk away mid-NAR.
        assert!(matches!(s.next().await.unwrap(), Next::Data(_)));
        drop(s);
        // The only thread comes free again quickly: the next NAR is made.
        let (_, d) = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            collect(&engine, root, Compression::None),
        )
        .await
        .expect("the cancelled NAR released its thread");
        assert_eq!(d.nar_size, nar.len() as u64);
    }

    /// While a producer waits for a block another thread is compressing, it makes a
    /// queued NAR known to fit in one frame, instead of leaving it to wait for a free
    /// thread; a NAR of unknown size, or bigger, waits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_producer_waiting_for_a_helper_makes_small_nars_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        // xz level 6 cuts 16 MiB blocks: the other thread takes the first, and the
        // producer compresses the last, of 4 MiB (random bytes: no shortcut), long
        // after the other thread has woken up and taken the first.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let bytes: Vec<u8> = (0..20 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let big = dir.path().join("random");
        std::fs::write(&big, &bytes).unwrap();
        let small = dir.path().join("small");
        std::fs::write(&small, b"hello").unwrap();
        let mut small_nar = Vec::new();
        nar::dump(&small, &mut small_nar).unwrap();
        let small_size = Some(small_nar.len() as u64);

        let engine = Engine::new(2).unwrap();
        let mut s = engine
            .nar(big.clone(), Compression::Xz, None, false, None)
            .await
            .unwrap();
        let Next::Data(header) = s.next().await.unwrap() else {
            panic!("no header first")
        };
        // By now the producer has cut the first block, the other thread has it, and
        // the producer waits for it.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        // The second permit is free: this waits only for a thread to make it.
        let mut t = engine
            .nar(small.clone(), Compression::Xz, None, false, small_size)
            .await
            .unwrap();
        let (small_file, small_digest) = drain(&mut t, Vec::new()).await;
        check_digest(&small_nar, &small_file, &small_digest);
        // It was made before the first block was done: the waiting producer made it.
        // (Had it waited for a free thread, the block would have gone out before the
        // thread that compressed it came free.)
        assert!(
            matches!(s.rx.try_recv(), Err(mpsc::error::TryRecvError::Empty)),
            "the small NAR waited for the first block"
        );
        let (out, digest) = drain(&mut s, header.to_vec()).await;
        let mut nar = Vec::new();
        nar::dump(&big, &mut nar).unwrap();
        check_digest(&nar, &out, &digest);
        let mut back = Vec::new();
        liblzma::read::XzDecoder::new(&out[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, nar);

        // Without its size, the same small NAR waits for a free thread.
        let mut s = engine
            .nar(big, Compression::Xz, None, false, None)
            .await
            .unwrap();
        s.next().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let (_, d) = collect(&engine, small, Compression::Xz).await;
        assert_eq!(d.nar_size, small_nar.len() as u64);
        assert!(
            s.rx.try_recv().is_ok(),
            "a NAR of unknown size was made inside another's wait"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_puts_work_on_a_pool_thread_and_survives_a_panic() {
        let engine = Engine::new(1).unwrap();
        let name = engine
            .run(|| std::thread::current().name().map(str::to_string))
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("narpipe-nar-0"));
        let err = engine.run(|| panic!("on purpose")).await.unwrap_err();
        assert!(matches!(err, Error::Panicked), "{err}");
        // The one thread is still there, and its permit came back.
        assert_eq!(engine.run(|| 2 + 2).await.unwrap(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_path_is_an_archive_error() {
        let engine = Engine::new(1).unwrap();
        let mut s = engine
            .nar(
                "/nonexistent/narpipe".into(),
                Compression::Zstd,
                None,
                false,
                None,
            )
            .await
            .unwrap();
        let err = s.next().await.err().expect("an error");
        assert!(matches!(err, Error::Archive(_)), "{err}");
        // The cause is in the message: the daemon logs `{e}`.
        assert!(err.to_string().contains("No such file"), "{err}");
    }
}
