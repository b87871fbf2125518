//! `stage_input`: what a stage reads of a batch of consumed records, in one pass.
//!
//! For each `confluent_kafka.Message`: `(key, value, where)` (where: `place(message)` only
//! when the key may not serve as an id: none, empty or not ASCII; else ""), its partition
//! and its offset; and the distinct first `head_len` bytes of the non-empty values (the
//! schema headers the codec resolves). The same as streams/pipeline/stages.py's Python
//! (`stage_input`, `schema_heads` and the stage's partition and offset lists), checked
//! against it when loaded.

use std::collections::HashSet;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PySet, PyString, PyTuple};

/// A key that may serve as a record's id: non-empty ASCII bytes (or text).
fn usable_key(key: &Bound<'_, PyAny>) -> bool {
    if let Ok(b) = key.cast::<PyBytes>() {
        let bytes = b.as_bytes();
        return !bytes.is_empty() && bytes.is_ascii();
    }
    if let Ok(s) = key.cast::<PyString>() {
        return s.to_str().is_ok_and(|t| !t.is_empty() && t.is_ascii());
    }
    false
}

#[pyfunction]
#[allow(clippy::type_complexity)]
pub fn stage_input<'py>(
    py: Python<'py>,
    messages: &Bound<'py, PyList>,
    place: &Bound<'py, PyAny>,
    head_len: usize,
) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>, Bound<'py, PyList>, Bound<'py, PySet>)> {
    let n = messages.len();
    let (key_name, value_name) = (intern!(py, "key"), intern!(py, "value"));
    let (partition_name, offset_name) = (intern!(py, "partition"), intern!(py, "offset"));
    let nowhere = intern!(py, "");
    let mut inputs: Vec<Bound<'py, PyTuple>> = Vec::with_capacity(n);
    let mut partitions: Vec<Bound<'py, PyAny>> = Vec::with_capacity(n);
    let mut offsets: Vec<Bound<'py, PyAny>> = Vec::with_capacity(n);
    let mut heads: HashSet<Vec<u8>> = HashSet::new();
    for message in messages.iter() {
        let key = message.call_method0(key_name)?;
        let value = message.call_method0(value_name)?;
        let place_of = if usable_key(&key) { nowhere.clone().into_any() } else { place.call1((&message,))? };
        if let Ok(b) = value.cast::<PyBytes>() {
            let head = &b.as_bytes()[..b.as_bytes().len().min(head_len)];
            if !head.is_empty() && !heads.contains(head) {
                heads.insert(head.to_vec());
            }
        }
        inputs.push(PyTuple::new(py, [key, value, place_of])?);
        partitions.push(message.call_method0(partition_name)?);
        offsets.push(message.call_method0(offset_name)?);
    }
    let heads = PySet::new(py, heads.iter().map(|h| PyBytes::new(py, h)))?;
    Ok((PyList::new(py, inputs)?, PyList::new(py, partitions)?, PyList::new(py, offsets)?, heads))
}
