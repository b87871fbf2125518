//! The mask stage's dedup window (streams/pipeline/dedup.py) in compiled code: the same
//! state and rules as the Python `DedupWindow`, which stays the reference (a differential
//! test drives both with the same operations: tests/unit/test_dedup_core.py).
//!
//! Per raw partition: a map of fingerprint -> (raw timestamp, offset) and the fingerprints
//! in admission order (an id admitted again is appended again; `moved` counts its earlier
//! places, which expiry and `entries` skip), an undo log of every change since the last
//! commit (`rollback`), and the changelog items the open transaction admitted (`flush`).
//!
//! **Fingerprint.** 128 bits: two SipHash-1-3 digests of the id under two keys drawn at
//! random per process (std's `RandomState`; the window is rebuilt from the changelog's ids
//! in each process). Two ids share one with probability 2^-128: with 200,000 ids held in
//! one partition, a new id is taken for a copy of one (and dropped) with probability
//! 5.9e-34; at 50,000 ev/s that is 9e-22 records a year. The map hashes the fingerprint by
//! its low 64 bits (already keyed and uniform: no second hash).
//!
//! **Memory.** A map slot is 32 bytes (fingerprint, timestamp, offset) and a control byte,
//! at a load of 7/16 to 7/8; the order queue 16 bytes a place: 94 bytes per id held on 6
//! partitions at the default bound, at most ~115 (Python's window: ~163;
//! benchmarks/dedup_window.py measures both).

use std::collections::hash_map::{Entry as Slot, RandomState};
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

const MAX_ID_BYTES: usize = 1024; // longer ids are not remembered (dedup.MAX_ID_BYTES)
const MAGIC: &[u8; 2] = b"\xff\x01"; // dedup.MAGIC
const HEADER_BYTES: usize = 6; // dedup.HEADER: magic, count (u32)
const CHUNK_BYTES: usize = 64 * 1024; // dedup.CHUNK_BYTES
const EXPIRE_EVERY: u64 = 256; // a periodic expiry every 256 admissions

type Fp = u128;

/// The map's hash of a fingerprint: its low 64 bits (a keyed digest already).
#[derive(Default)]
struct FpHasher(u64);

impl Hasher for FpHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b); // not used: u128 keys call write_u128
        }
    }

    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FpMap<V> = HashMap<Fp, V, BuildHasherDefault<FpHasher>>;

#[derive(Clone, Copy, PartialEq, Eq)]
struct Entry {
    timestamp: i64,
    offset: i64,
}

/// One partition's ids, as `dedup.Held`.
#[derive(Default)]
struct Held {
    ids: FpMap<Entry>,
    order: VecDeque<Fp>,
    moved: FpMap<u32>,
}

impl Held {
    /// `(fingerprint, entry)` of each id held, oldest first (its earlier places skipped).
    fn entries(&self) -> Vec<(Fp, Entry)> {
        let mut skip = self.moved.clone();
        let mut out = Vec::with_capacity(self.ids.len());
        for d in &self.order {
            if let Some(n) = skip.get_mut(d) {
                if *n > 0 {
                    *n -= 1;
                    continue;
                }
            }
            out.push((*d, self.ids[d]));
        }
        out
    }

    fn compact(&mut self) {
        self.order = self.entries().into_iter().map(|(d, _)| d).collect();
        self.moved = FpMap::default();
    }

    fn skip_one(&mut self, d: Fp) {
        *self.moved.entry(d).or_insert(0) += 1;
    }

    fn unskip_one(&mut self, d: Fp) {
        if let Slot::Occupied(mut slot) = self.moved.entry(d) {
            if *slot.get() <= 1 {
                slot.remove();
            } else {
                *slot.get_mut() -= 1;
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Admitted, // `before`: the id's entry before, or None (it was new)
    Expired,  // `before`: the entry forgotten, or None (a skipped place popped)
}

struct Undo {
    change: Change,
    partition: i64,
    fp: Fp,
    before: Option<Entry>,
}

/// The changelog items (`dedup.ITEM` and the id) the open transaction admitted on a partition.
struct Pending {
    partition: i64,
    data: Vec<u8>,
    ends: Vec<usize>, // where each item ends in `data`
}

/// The mask stage's window of message ids written, per raw partition (streams/pipeline/dedup.py).
#[pyclass(module = "streams_core")]
pub struct DedupWindow {
    window_ms: i64,
    limit: usize,
    keys: (RandomState, RandomState),
    state: HashMap<i64, Held>,
    newest: HashMap<i64, i64>,
    size: usize,
    admitted: u64,
    undo: Vec<Undo>,
    pending: Vec<Pending>, // in the order of each partition's first id in the transaction
}

/// What the window holds of an id: two SipHash-1-3 digests under the process's two keys.
fn fingerprint(keys: &(RandomState, RandomState), key: &[u8]) -> Fp {
    let mut a = keys.0.build_hasher();
    a.write(key);
    let mut b = keys.1.build_hasher();
    b.write(key);
    (u128::from(b.finish()) << 64) | u128::from(a.finish())
}

/// Forget ids from the front of a partition's order: past the window (older than
/// `oldest_kept`), or over the bound. The ids forgotten inside the window are returned
/// (counted as evictions).
fn expire(held: &mut Held, partition: i64, oldest_kept: i128, size: &mut usize, limit: usize, undo: &mut Vec<Undo>) -> u64 {
    let mut evicted = 0;
    while let Some(&d) = held.order.front() {
        if !held.moved.is_empty() && held.moved.contains_key(&d) {
            held.order.pop_front(); // an earlier place of an id admitted again since
            held.unskip_one(d);
            undo.push(Undo { change: Change::Expired, partition, fp: d, before: None });
            continue;
        }
        let entry = held.ids[&d];
        if i128::from(entry.timestamp) >= oldest_kept {
            if *size <= limit {
                break;
            }
            evicted += 1; // forgotten inside the window: a copy is no longer caught
        }
        held.order.pop_front();
        held.ids.remove(&d);
        *size -= 1;
        undo.push(Undo { change: Change::Expired, partition, fp: d, before: Some(entry) });
    }
    evicted
}

/// A record of the batch with an id to remember.
struct Record<'py> {
    index: usize,
    partition: i64,
    offset: i64,
    timestamp: i64,
    key: Bound<'py, PyBytes>,
    fp: Fp,
}

impl DedupWindow {
    /// Fingerprint each record, and read ahead the map slots the batch will touch: each
    /// id's, and, where the bound will evict, those of the ids at the front of the order.
    fn warm(&self, records: &mut [Record<'_>]) {
        let mut touched = 0usize;
        let mut at = 0;
        while at < records.len() {
            let partition = records[at].partition;
            let run = records[at..].iter().position(|r| r.partition != partition).unwrap_or(records.len() - at);
            let held = self.state.get(&partition);
            for r in &mut records[at..at + run] {
                r.fp = fingerprint(&self.keys, r.key.as_bytes());
                if let Some(h) = held {
                    touched += usize::from(h.ids.contains_key(&r.fp));
                }
            }
            if let Some(h) = held {
                if self.size + run > self.limit {
                    for d in h.order.iter().take(run) {
                        touched += usize::from(h.ids.contains_key(d));
                    }
                }
            }
            at += run;
        }
        std::hint::black_box(touched);
    }

    fn expire(&mut self, partition: i64) -> u64 {
        let oldest_kept = i128::from(*self.newest.get(&partition).unwrap_or(&0)) - i128::from(self.window_ms);
        match self.state.get_mut(&partition) {
            Some(held) => expire(held, partition, oldest_kept, &mut self.size, self.limit, &mut self.undo),
            None => 0,
        }
    }

    /// `dedup.DedupWindow.admit_batch` over `n` records: `key(i)` (None, or bytes) read first,
    /// then, for a key to remember, `partitions[i]`, `offsets[i]` and `timestamp(i)`.
    ///
    /// In two passes: the batch is read and fingerprinted first, and the map slots the
    /// second pass will touch (each id's, and those of the ids the bound will evict) are
    /// read in tight loops, so their cache misses overlap instead of queueing one by one.
    #[allow(clippy::too_many_arguments)]
    fn admit<'py>(
        &mut self,
        py: Python<'py>,
        partitions: &Bound<'py, PyList>,
        offsets: &Bound<'py, PyList>,
        n: usize,
        mut key: impl FnMut(usize) -> PyResult<Bound<'py, PyAny>>,
        mut timestamp: impl FnMut(usize) -> PyResult<i64>,
        redrive: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<(Bound<'py, PyAny>, u64)> {
        if partitions.len() != n || offsets.len() != n {
            return Err(PyValueError::new_err("admit: every column must have one item per record"));
        }
        // Pass 1: the records with an id to remember.
        let mut records: Vec<Record<'py>> = Vec::with_capacity(n);
        for i in 0..n {
            let item = key(i)?;
            if item.is_none() {
                continue;
            }
            let len = item.cast::<PyBytes>()?.as_bytes().len();
            if len == 0 || len > MAX_ID_BYTES {
                continue;
            }
            let partition: i64 = partitions.get_item(i)?.extract()?;
            let offset: i64 = offsets.get_item(i)?.extract()?;
            let ts = timestamp(i)?;
            records.push(Record { index: i, partition, offset, timestamp: ts, key: item.cast_into::<PyBytes>()?, fp: 0 });
        }
        self.warm(&mut records);
        let Self { window_ms, limit, keys: _, state, newest: newest_of, size, admitted, undo, pending: pending_of } = self;
        let (window_ms, limit) = (i128::from(*window_ms), *limit);
        let mut keep: Option<Vec<bool>> = None; // made at the first record not written
        let mut current: Option<i64> = None;
        let mut held: Option<&mut Held> = None;
        let mut newest = -1i64;
        let mut pending_at: Option<usize> = None;
        let mut evicted = 0u64;
        for r in &records {
            let (i, partition, offset, ts, d) = (r.index, r.partition, r.offset, r.timestamp, r.fp);
            let bytes = r.key.as_bytes();
            if current != Some(partition) {
                if let Some(p) = current {
                    newest_of.insert(p, newest);
                }
                current = Some(partition);
                held = Some(state.entry(partition).or_default());
                newest = *newest_of.get(&partition).unwrap_or(&-1);
                pending_at = pending_of.iter().position(|x| x.partition == partition);
            }
            let Some(h) = held.as_deref_mut() else { unreachable!("set at the partition's first record") };
            if ts > newest {
                newest = ts;
            }
            let seen = h.ids.get(&d).copied();
            if let Some(seen) = seen {
                if i128::from(seen.timestamp) >= i128::from(newest) - window_ms {
                    // (older: forgotten, even if not yet removed)
                    if seen.offset < offset {
                        let forced = match redrive {
                            Some(f) => f.call1((i,))?.is_truthy()?,
                            None => false,
                        };
                        if !forced {
                            keep.get_or_insert_with(|| vec![true; n])[i] = false; // a later copy of an id written
                            continue;
                        }
                    } else if seen.offset == offset {
                        continue; // the same record again (a replay, a rewind): reprocess it
                    }
                }
            }
            undo.push(Undo { change: Change::Admitted, partition, fp: d, before: seen });
            h.ids.insert(d, Entry { timestamp: ts, offset });
            h.order.push_back(d); // expiry goes front to back: the newest at the back
            if seen.is_none() {
                *size += 1;
            } else {
                h.skip_one(d); // its earlier place is skipped
            }
            let at = *pending_at.get_or_insert_with(|| {
                pending_of.push(Pending { partition, data: Vec::with_capacity(4096), ends: Vec::new() });
                pending_of.len() - 1
            });
            let p = &mut pending_of[at];
            p.data.extend_from_slice(&offset.to_be_bytes());
            p.data.extend_from_slice(&ts.to_be_bytes());
            p.data.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            p.data.extend_from_slice(bytes);
            p.ends.push(p.data.len());
            *admitted += 1;
            // Over a bound: at once. Past the window: every 256 ids (until then such an id only
            // takes memory; the check above already treats it as forgotten).
            if *size > limit || *admitted % EXPIRE_EVERY == 0 {
                newest_of.insert(partition, newest);
                evicted += expire(h, partition, i128::from(newest) - window_ms, size, limit, undo);
            }
        }
        if let Some(p) = current {
            newest_of.insert(p, newest);
        }
        let verdicts = match keep {
            None => py.None().into_bound(py),
            Some(keep) => PyList::new(py, keep)?.into_any(),
        };
        Ok((verdicts, evicted))
    }
}

#[pymethods]
impl DedupWindow {
    #[new]
    fn new(window_ms: i64, limit: usize) -> Self {
        DedupWindow {
            window_ms,
            limit,
            keys: (RandomState::new(), RandomState::new()),
            state: HashMap::new(),
            newest: HashMap::new(),
            size: 0,
            admitted: 0,
            undo: Vec::new(),
            pending: Vec::new(),
        }
    }

    /// Ids held over all partitions.
    #[getter]
    fn size(&self) -> usize {
        self.size
    }

    /// The newest raw timestamp seen per partition.
    #[getter]
    fn newest(&self) -> HashMap<i64, i64> {
        self.newest.clone()
    }

    /// The partitions that have state (a record with an id was read on them).
    fn partitions(&self) -> Vec<i64> {
        let mut out: Vec<i64> = self.state.keys().copied().collect();
        out.sort_unstable();
        out
    }

    /// Whether to write each record's output: `(None if every one, else a list of bools,
    /// evictions)`. Columns: `partitions`, `offsets`, `keys` (bytes or None) and `timestamps`
    /// (raw, ms); `redrive(i)`, called only for a copy, says record `i` is a deliberate re-send.
    #[pyo3(signature = (partitions, offsets, keys, timestamps, redrive=None))]
    fn admit_batch<'py>(
        &mut self,
        py: Python<'py>,
        partitions: &Bound<'py, PyList>,
        offsets: &Bound<'py, PyList>,
        keys: &Bound<'py, PyList>,
        timestamps: &Bound<'py, PyList>,
        redrive: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<(Bound<'py, PyAny>, u64)> {
        if timestamps.len() != keys.len() {
            return Err(PyValueError::new_err("admit: every column must have one item per record"));
        }
        self.admit(py, partitions, offsets, keys.len(), |i| keys.get_item(i), |i| timestamps.get_item(i)?.extract(), redrive)
    }

    /// `admit_batch` reading the mask stage's objects itself: each key is `outputs[i][0]`, each
    /// timestamp `messages[i].timestamp()[1]` (read only for a key it remembers).
    #[pyo3(signature = (partitions, offsets, outputs, messages, redrive=None))]
    fn admit_records<'py>(
        &mut self,
        py: Python<'py>,
        partitions: &Bound<'py, PyList>,
        offsets: &Bound<'py, PyList>,
        outputs: &Bound<'py, PyList>,
        messages: &Bound<'py, PyList>,
        redrive: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<(Bound<'py, PyAny>, u64)> {
        if messages.len() != outputs.len() {
            return Err(PyValueError::new_err("admit: every column must have one item per record"));
        }
        let name = intern!(py, "timestamp");
        self.admit(
            py,
            partitions,
            offsets,
            outputs.len(),
            |i| outputs.get_item(i)?.cast_into::<PyTuple>()?.get_item(0),
            |i| messages.get_item(i)?.call_method0(name)?.cast_into::<PyTuple>()?.get_item(1)?.extract(),
            redrive,
        )
    }

    /// The open transaction's changelog values, `(partition, first offset, value)` each: per
    /// partition (in the order of its first id) its items, cut at `CHUNK_BYTES`; then none pending.
    fn flush<'py>(&mut self, py: Python<'py>) -> PyResult<Vec<(i64, i64, Bound<'py, PyBytes>)>> {
        let mut out = Vec::new();
        for pending in std::mem::take(&mut self.pending) {
            let mut start = 0; // item index
            while start < pending.ends.len() {
                let from = if start == 0 { 0 } else { pending.ends[start - 1] };
                let mut end = start;
                let mut bytes = HEADER_BYTES;
                while end < pending.ends.len() {
                    let len = pending.ends[end] - if end == 0 { 0 } else { pending.ends[end - 1] };
                    if end > start && bytes + len > CHUNK_BYTES {
                        break;
                    }
                    bytes += len;
                    end += 1;
                }
                let to = pending.ends[end - 1];
                let first_offset = i64::from_be_bytes(pending.data[from..from + 8].try_into().expect("8 bytes"));
                let value = PyBytes::new_with(py, HEADER_BYTES + to - from, |buf| {
                    buf[..2].copy_from_slice(MAGIC);
                    buf[2..6].copy_from_slice(&((end - start) as u32).to_be_bytes());
                    buf[6..].copy_from_slice(&pending.data[from..to]);
                    Ok(())
                })?;
                out.push((pending.partition, first_offset, value));
                start = end;
            }
        }
        Ok(out)
    }

    /// The open transaction committed: nothing left to undo.
    fn commit(&mut self) {
        self.undo.clear();
        self.pending.clear();
        for held in self.state.values_mut() {
            if held.order.len() > 2 * held.ids.len() + 1024 {
                held.compact(); // many ids admitted again (redrives, replays)
            }
        }
    }

    /// Undo every change since the last commit, newest first: each partition's order is
    /// back as it was, place for place.
    fn rollback(&mut self) {
        for u in std::mem::take(&mut self.undo).into_iter().rev() {
            let held = self.state.get_mut(&u.partition).expect("forget and install drop their undo entries");
            match u.change {
                Change::Admitted => {
                    held.order.pop_back();
                    match u.before {
                        None => {
                            held.ids.remove(&u.fp);
                            self.size -= 1;
                        }
                        Some(before) => {
                            held.ids.insert(u.fp, before);
                            held.unskip_one(u.fp);
                        }
                    }
                }
                Change::Expired => {
                    held.order.push_front(u.fp);
                    match u.before {
                        None => held.skip_one(u.fp),
                        Some(before) => {
                            held.ids.insert(u.fp, before);
                            self.size += 1;
                        }
                    }
                }
            }
        }
        self.pending.clear();
    }

    /// Partitions that left this worker: their state and undo entries go.
    fn forget(&mut self, partitions: Vec<i64>) {
        for p in &partitions {
            if let Some(held) = self.state.remove(p) {
                self.size -= held.ids.len();
            }
            self.newest.remove(p);
        }
        self.undo.retain(|u| !partitions.contains(&u.partition));
    }

    /// Make `entries` (`(id, (offset, raw timestamp))` as read from the changelog) the state
    /// of `partition`: `(ids held, evictions)`.
    fn install(&mut self, partition: i64, entries: Vec<(Vec<u8>, (i64, i64))>) -> (usize, u64) {
        self.undo.retain(|u| u.partition != partition); // the state they undo is replaced
        let newest = entries.iter().map(|(_, (_, ts))| *ts).max().unwrap_or(0);
        let oldest_kept = i128::from(newest) - i128::from(self.window_ms);
        let mut sorted: Vec<&(Vec<u8>, (i64, i64))> =
            entries.iter().filter(|(_, (_, ts))| i128::from(*ts) >= oldest_kept).collect();
        sorted.sort_by_key(|(_, (_, ts))| *ts); // stable, as Python's sorted
        // Each id at its last place, with its last entry (Python: popped and inserted again).
        let mut held = Held::default();
        let mut order: Vec<Fp> = Vec::with_capacity(sorted.len());
        for (key, (offset, timestamp)) in sorted.into_iter().rev() {
            let d = fingerprint(&self.keys, key);
            if let Slot::Vacant(slot) = held.ids.entry(d) {
                slot.insert(Entry { timestamp: *timestamp, offset: *offset });
                order.push(d);
            }
        }
        held.order = order.into_iter().rev().collect();
        let before = self.state.get(&partition).map_or(0, |h| h.ids.len());
        let ids = held.ids.len();
        self.size = self.size + ids - before;
        self.state.insert(partition, held);
        self.newest.insert(partition, newest);
        (ids, self.expire(partition))
    }

    /// `(fingerprint, offset, raw timestamp)` of each id held for `partition`, oldest first.
    fn entries(&self, partition: i64) -> Vec<(u128, i64, i64)> {
        self.state
            .get(&partition)
            .map(|held| held.entries().into_iter().map(|(d, e)| (d, e.offset, e.timestamp)).collect())
            .unwrap_or_default()
    }

    /// Bytes the window holds on the heap (its tables' and queues' capacities), for benchmarks.
    fn heap_bytes(&self) -> usize {
        fn map_bytes<K, V, S>(m: &HashMap<K, V, S>) -> usize {
            // hashbrown: buckets (a power of two, capacity = 7/8 of them) of (K, V) and a control byte each
            let cap = m.capacity();
            if cap == 0 {
                return 0;
            }
            let buckets = if cap < 8 { (cap + 1).next_power_of_two() } else { (cap * 8 / 7).next_power_of_two() };
            buckets * (std::mem::size_of::<(K, V)>() + 1) + 16
        }
        let held: usize = self
            .state
            .values()
            .map(|h| map_bytes(&h.ids) + map_bytes(&h.moved) + h.order.capacity() * std::mem::size_of::<Fp>())
            .sum();
        let pending: usize = self.pending.iter().map(|p| p.data.capacity() + p.ends.capacity() * 8).sum();
        held + map_bytes(&self.state) + map_bytes(&self.newest) + self.undo.capacity() * std::mem::size_of::<Undo>() + pending
    }
}
