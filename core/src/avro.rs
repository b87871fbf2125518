//! `RecordEncoder`: a flat Avro record's binary encoding for a whole batch in one call.
//!
//! The Python side (streams/privacy/core.py, `record_encoder`) reads the writer schema and
//! says, per field in schema order, its kind, whether it is `["null", X]`, and where each
//! record's value is: item `item` of the tuple at position `i` of column `column`
//! (`item` -1: that element itself; `column` -1: always null). Values are taken exactly as
//! streams/io/avro_fast.py (and so fastavro) would write them; any other value (a `str`
//! with no UTF-8 form, a `bool` where an int goes, a number out of range, a null where
//! none is allowed) gives `None` for its record, which the caller encodes with the
//! reference. The encoder knows no schema names and no masking.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyInt, PyList, PyString, PyTuple};

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    String,
    Bytes,
    Int,
    Long,
    Boolean,
}

struct Field {
    kind: Kind,
    nullable: bool,
    column: isize,
    item: isize,
}

#[pyclass(frozen, module = "streams_core")]
pub struct RecordEncoder {
    header: Vec<u8>,
    fields: Vec<Field>,
    key: (isize, isize), // where each record's key (a `str`, written as its UTF-8) is
}

/// Zig-zag varint of a long, appended to `out`.
fn put_long(n: i64, out: &mut Vec<u8>) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z > 0x7F {
        out.push((z as u8 & 0x7F) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// The value at `(column, item)` of record `i`: `Ok(None)` for a null column,
/// `Err(())` when the element holding it is not a tuple that long (a record the caller's core declined).
fn value_at<'py>(columns: &[Bound<'py, PyList>], column: isize, item: isize, i: usize) -> PyResult<Result<Option<Bound<'py, PyAny>>, ()>> {
    if column < 0 {
        return Ok(Ok(None));
    }
    let element = columns[column as usize].get_item(i)?;
    if item < 0 {
        return Ok(Ok(Some(element)));
    }
    match element.cast_into::<PyTuple>() {
        Ok(t) => Ok(t.get_item(item as usize).map(Some).map_err(|_| ())),
        Err(_) => Ok(Err(())),
    }
}

/// `value` of `kind` appended to `out`; false when it is not one avro_fast writes as is.
fn put_value(kind: Kind, value: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> bool {
    match kind {
        Kind::String => match value.cast_exact::<PyString>() {
            Ok(s) => match s.to_str() {
                Ok(text) => {
                    put_long(text.len() as i64, out);
                    out.extend_from_slice(text.as_bytes());
                    true
                }
                Err(_) => false,
            },
            Err(_) => false,
        },
        Kind::Bytes => match value.cast_exact::<PyBytes>() {
            Ok(b) => {
                put_long(b.as_bytes().len() as i64, out);
                out.extend_from_slice(b.as_bytes());
                true
            }
            Err(_) => false,
        },
        Kind::Int | Kind::Long => {
            if !value.is_exact_instance_of::<PyInt>() {
                return false; // a bool (an int subclass) is the reference's to decide
            }
            let Ok(n) = value.extract::<i64>() else { return false };
            if kind == Kind::Int && i32::try_from(n).is_err() {
                return false;
            }
            put_long(n, out);
            true
        }
        Kind::Boolean => match value.cast_exact::<PyBool>() {
            Ok(b) => {
                out.push(u8::from(b.is_true()));
                true
            }
            Err(_) => false,
        },
    }
}

#[pymethods]
impl RecordEncoder {
    /// `fields`: `(kind, nullable, column, item)` per schema field, kind one of `string`,
    /// `bytes`, `int`, `long` (a timestamp-millis too), `boolean`; `key`: `(column, item)`.
    #[new]
    fn new(header: Vec<u8>, fields: Vec<(String, bool, isize, isize)>, key: (isize, isize)) -> PyResult<Self> {
        let mut out = Vec::with_capacity(fields.len());
        for (kind, nullable, column, item) in fields {
            let kind = match kind.as_str() {
                "string" => Kind::String,
                "bytes" => Kind::Bytes,
                "int" => Kind::Int,
                "long" => Kind::Long,
                "boolean" => Kind::Boolean,
                _ => return Err(PyValueError::new_err("RecordEncoder: a field kind it does not encode")),
            };
            if column < 0 && !nullable {
                return Err(PyValueError::new_err("RecordEncoder: a null column for a field that is not nullable"));
            }
            out.push(Field { kind, nullable, column, item });
        }
        if key.0 < 0 {
            return Err(PyValueError::new_err("RecordEncoder: the key needs a column"));
        }
        Ok(Self { header, fields: out, key })
    }

    /// For each of the `n` records of `columns`: `make((key, value, None))` (key: the UTF-8
    /// of the key field; value: header + the record's Avro encoding), or `None` where a
    /// value is not one the encoder writes as the reference does; and how many were `None`.
    fn encode<'py>(
        &self,
        py: Python<'py>,
        columns: Vec<Bound<'py, PyList>>,
        n: usize,
        make: &Bound<'py, PyAny>,
    ) -> PyResult<(Bound<'py, PyList>, usize)> {
        let used = self.fields.iter().map(|f| f.column).chain([self.key.0]);
        for column in used.filter(|c| *c >= 0) {
            if columns.get(column as usize).is_none_or(|c| c.len() < n) {
                return Err(PyValueError::new_err("RecordEncoder: a column with fewer items than records"));
            }
        }
        let mut out: Vec<Bound<'py, PyAny>> = Vec::with_capacity(n);
        let mut declined = 0;
        let mut buf: Vec<u8> = Vec::with_capacity(512);
        for i in 0..n {
            match self.one(py, &columns, i, &mut buf)? {
                Some((key, value)) => {
                    let record = PyTuple::new(py, [key.into_any(), value.into_any(), py.None().into_bound(py)])?;
                    out.push(make.call1((record,))?);
                }
                None => {
                    declined += 1;
                    out.push(py.None().into_bound(py));
                }
            }
        }
        Ok((PyList::new(py, out)?, declined))
    }
}

impl RecordEncoder {
    /// Record `i`'s key and value, or `None` where the encoder declines it.
    fn one<'py>(
        &self,
        py: Python<'py>,
        columns: &[Bound<'py, PyList>],
        i: usize,
        buf: &mut Vec<u8>,
    ) -> PyResult<Option<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)>> {
        buf.clear();
        buf.extend_from_slice(&self.header);
        for f in &self.fields {
            let Ok(value) = value_at(columns, f.column, f.item, i)? else { return Ok(None) };
            match value {
                Some(v) if !v.is_none() => {
                    if f.nullable {
                        buf.push(2); // union branch 1
                    }
                    if !put_value(f.kind, &v, buf) {
                        return Ok(None);
                    }
                }
                _ if f.nullable => buf.push(0), // union branch 0: null
                _ => return Ok(None),
            }
        }
        let Ok(Some(key)) = value_at(columns, self.key.0, self.key.1, i)? else { return Ok(None) };
        let Ok(text) = key.cast_exact::<PyString>() else { return Ok(None) };
        let Ok(text) = text.to_str() else { return Ok(None) };
        Ok(Some((PyBytes::new(py, text.as_bytes()), PyBytes::new(py, buf))))
    }
}
