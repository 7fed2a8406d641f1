//! A bounded on-disk spool of one job attempt's events, between the training thread and the server.
//!
//! The training thread appends each event as a JSON line with its per-attempt sequence number; the
//! async side reads the undelivered lines in order, posts them, and acknowledges what the server
//! stored. While the server is unreachable the events wait on disk, not in memory; when the
//! undelivered part reaches the bound, training waits at its next event for the server rather than
//! dropping anything. Delivered events are cut from the front of the file, so it stays under twice the
//! bound however long the run. There is one reader (the task posting batches).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{Context, Result};
use cpt_protocol::worker::{Envelope, MAX_BATCH_EVENTS};
use cpt_protocol::Event;

/// The default bound on undelivered events: at a step a second, days of step events.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;
/// At most this many bytes of events go into one batch.
const MAX_BATCH_BYTES: u64 = 256 << 10;

/// Both ends of a spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    /// Wakes a writer waiting for room.
    room: Condvar,
    /// Wakes the reader when something was written or the writer closed.
    written: tokio::sync::Notify,
}

struct State {
    file: File,
    /// Bytes in the file; lines below this offset are complete.
    end: u64,
    /// Bytes the server has acknowledged.
    delivered: u64,
    next_seq: u64,
    closed: bool,
    /// The server no longer takes this attempt's events: stop writing and never block.
    abandoned: bool,
}

/// Undelivered events read from the spool, to be acknowledged once the server stored them.
pub struct Batch {
    pub events: Vec<Envelope>,
    end: u64,
}

/// Locks a spool file for its writer. A crashed worker's lock goes with its process, so a spool
/// that can be locked by someone else is a leftover (see `leftover`), and one that cannot is live.
pub fn lock(file: &File) -> std::io::Result<()> {
    rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(std::io::Error::from)
}

/// Parses spooled lines (complete ones only).
pub fn parse_lines(bytes: &[u8], path: &Path) -> Result<Vec<Envelope>> {
    bytes
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(serde_json::from_slice)
        .collect::<Result<Vec<Envelope>, _>>()
        .with_context(|| format!("reading {}", path.display()))
}

impl Spool {
    /// Creates (or empties) the spool file at `path`.
    pub fn create(path: &Path, max_bytes: u64) -> Result<Spool> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(path)
            .with_context(|| format!("creating the event spool {}", path.display()))?;
        lock(&file).with_context(|| format!("locking {}", path.display()))?;
        let state = State { file, end: 0, delivered: 0, next_seq: 0, closed: false, abandoned: false };
        let shared = Shared {
            path: path.to_path_buf(),
            max_bytes,
            state: Mutex::new(state),
            room: Condvar::new(),
            written: tokio::sync::Notify::new(),
        };
        Ok(Spool { shared: Arc::new(shared) })
    }

    /// Appends one event with the next sequence number and `time`, waiting while the undelivered
    /// part is at the bound.
    pub fn append(&self, event: Event, time_ms: u64) -> Result<()> {
        let mut state = self.lock();
        let envelope = Envelope { seq: state.next_seq, time: time_ms, event };
        let mut line = serde_json::to_vec(&envelope)?;
        line.push(b'\n');
        let mut warned = false;
        while !state.abandoned
            && state.end > state.delivered
            && state.end - state.delivered + line.len() as u64 > self.shared.max_bytes
        {
            if !warned {
                tracing::warn!(spool = %self.shared.path.display(), "event spool full: training waits for the server");
                warned = true;
            }
            state = self.shared.room.wait(state).expect("spool lock");
        }
        if state.abandoned {
            return Ok(());
        }
        let end = state.end;
        state.file.write_all_at(&line, end).with_context(|| format!("writing {}", self.shared.path.display()))?;
        state.end += line.len() as u64;
        state.next_seq += 1;
        drop(state);
        self.shared.written.notify_one();
        Ok(())
    }

    /// No more events will be appended: `next_batch` returns `None` once the rest is read.
    pub fn close(&self) {
        self.lock().closed = true;
        self.shared.written.notify_one();
    }

    /// The server refuses this attempt's events: unblock and silence the writer.
    pub fn abandon(&self) {
        self.lock().abandoned = true;
        self.shared.room.notify_all();
    }

    /// The oldest undelivered events, waiting for some; `None` once closed and everything was read.
    pub async fn next_batch(&self) -> Result<Option<Batch>> {
        loop {
            let (start, end, closed) = {
                let state = self.lock();
                (state.delivered, state.end, state.closed)
            };
            if start < end {
                return self.read(start, end).map(Some);
            }
            if closed {
                return Ok(None);
            }
            // `notify_one` keeps a permit when nobody waits, so a write between the check and here
            // is not missed.
            self.shared.written.notified().await;
        }
    }

    /// Marks `batch` as stored by the server, making room for the writer.
    pub fn acknowledge(&self, batch: &Batch) -> Result<()> {
        let mut state = self.lock();
        state.delivered = batch.end;
        if state.delivered == state.end || state.delivered >= self.shared.max_bytes {
            // Keep the file from growing with the run: move the undelivered tail (at most the
            // bound) to the front, so the file never exceeds twice the bound.
            let mut tail = vec![0; (state.end - state.delivered) as usize];
            state.file.read_exact_at(&mut tail, state.delivered)?;
            state.file.write_all_at(&tail, 0)?;
            state
                .file
                .set_len(tail.len() as u64)
                .with_context(|| format!("compacting {}", self.shared.path.display()))?;
            (state.end, state.delivered) = (tail.len() as u64, 0);
        }
        drop(state);
        self.shared.room.notify_all();
        Ok(())
    }

    /// Undelivered bytes.
    #[cfg(test)]
    fn pending_bytes(&self) -> u64 {
        let state = self.lock();
        state.end - state.delivered
    }

    fn read(&self, start: u64, end: u64) -> Result<Batch> {
        // Bytes below `end` are complete lines that nobody rewrites until acknowledged, so they
        // are read without holding the lock.
        let file = self.lock().file.try_clone()?;
        let mut bytes = vec![0; (end - start).min(MAX_BATCH_BYTES) as usize];
        file.read_exact_at(&mut bytes, start).with_context(|| format!("reading {}", self.shared.path.display()))?;
        let complete = match bytes.iter().rposition(|&b| b == b'\n') {
            Some(last) => last + 1,
            None => {
                // One event larger than a batch: read it whole.
                let mut rest = vec![0; (end - start) as usize];
                file.read_exact_at(&mut rest, start)?;
                bytes = rest;
                bytes.iter().position(|&b| b == b'\n').context("a spooled event without its newline")? + 1
            }
        };
        let mut complete = complete;
        // At most a batch's worth of events: cut after the MAX_BATCH_EVENTS-th line.
        if let Some((cut, _)) =
            bytes[..complete].iter().enumerate().filter(|(_, &b)| b == b'\n').nth(MAX_BATCH_EVENTS - 1)
        {
            complete = cut + 1;
        }
        let events = parse_lines(&bytes[..complete], &self.shared.path)?;
        Ok(Batch { events, end: start + complete as u64 })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().expect("spool lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event of `step` about `pad` bytes long.
    fn event(step: u64, pad: usize) -> Event {
        Event::Sample { step, prompt: "x".repeat(pad), continuation: String::new() }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_full_spool_holds_the_writer_back_and_delivers_every_event_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool/attempt-1.jsonl");
        let spool = Spool::create(&path, 2048).unwrap();
        let writer = {
            let spool = spool.clone();
            std::thread::spawn(move || {
                for step in 0..200u64 {
                    spool.append(event(step, 40), 7).unwrap();
                    assert!(spool.pending_bytes() <= 2048, "the bound holds");
                }
                spool.close();
            })
        };
        let mut seen = Vec::new();
        let mut on_disk_while_waiting = 0;
        while let Some(batch) = spool.next_batch().await.unwrap() {
            // A slow server: the writer fills the spool and waits.
            on_disk_while_waiting = on_disk_while_waiting.max(std::fs::metadata(&path).unwrap().len());
            for event in &batch.events {
                assert_eq!(Some(event.seq), event.event.step());
                seen.push(event.seq);
            }
            spool.acknowledge(&batch).unwrap();
        }
        writer.join().unwrap();
        assert_eq!(seen, (0..200).collect::<Vec<_>>());
        assert!(on_disk_while_waiting > 0 && on_disk_while_waiting <= 2 * 2048, "{on_disk_while_waiting}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "delivered events leave the file");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_unacknowledged_batch_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::create(&dir.path().join("s.jsonl"), DEFAULT_MAX_BYTES).unwrap();
        for step in 0..3 {
            spool.append(event(step, 0), 1).unwrap();
        }
        let first = spool.next_batch().await.unwrap().unwrap();
        let again = spool.next_batch().await.unwrap().unwrap();
        assert_eq!(first.events, again.events);
        assert_eq!(again.events.len(), 3);
        spool.acknowledge(&again).unwrap();
        spool.close();
        assert!(spool.next_batch().await.unwrap().is_none());
    }

    #[test]
    fn an_abandoned_spool_never_blocks_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::create(&dir.path().join("s.jsonl"), 100).unwrap();
        spool.append(event(0, 20), 1).unwrap();
        let pending = spool.pending_bytes();
        spool.abandon();
        spool.append(event(0, 20), 1).unwrap();
        assert_eq!(spool.pending_bytes(), pending, "nothing more is written");
    }
}
