//! streams_core: the mask stage's per-value crypto for a whole batch in one call.
//!
//! Primitives only, with key schedules set once per object; how tokens and ciphertexts
//! are composed (which key, which prefix, which associated data, which text format)
//! stays in Python (streams/privacy/core.py), next to the reference in
//! streams/privacy/masking.py, so a change of scheme is a change there, not here.
//!
//! - `Mac(key, prefix)`: HMAC-SHA256 with the key and a constant message prefix absorbed
//!   once; `digests(values)` and `tokens(head, values)` (`head + base64url(digest)`).
//! - `Siv(keys)`: AES-SIV (RFC 5297) keys by index; `seal(...)` encrypts a batch, each
//!   value optionally padded, with shared associated data plus one item per value.
//! - `parse_logins(values, headers)`: the raw envelope and login body of each record, when
//!   it has the plain common shape (flat ASCII JSON without escapes, a dotted-quad or
//!   hex IPv6 address, ...), checked by the rules of streams/pipeline/mask.py; anything
//!   else is declined and read by the Python reference. No crypto, no scheme.
//! - `copy_binary(columns)`: rows as PostgreSQL's binary COPY stream (the key store's
//!   writes: one buffer for a batch's new key rows instead of a Python tuple per row).
//! - `RecordEncoder(header, fields, key)` (src/avro.rs): a flat Avro record's encoding for a
//!   batch, values taken from the caller's columns (the masked record; no schema names here).
//! - `stage_input(messages, place, head_len)` (src/stage.rs): a stage's reading of a batch
//!   of consumed records in one pass (inputs, partitions, offsets, schema headers).
//! - `DedupWindow(window_ms, limit)` (src/dedup.rs): the mask stage's window of message ids
//!   written, the state and rules of streams/pipeline/dedup.py (its Python reference).
//!
//! A value the core cannot take exactly as the reference does (a `str` that is not valid
//! UTF-8, such as a lone surrogate; a value too long for the 2-byte pad length; an
//! unknown key index) gives `None` in its place: the caller sends that record to the
//! reference. Nothing here formats a value into an error.

mod avro;
mod dedup;
mod stage;

use std::borrow::Cow;

use aes_siv::aead::KeyInit;
use aes_siv::siv::{Aes128Siv, Aes256Siv};
use hmac::{Hmac, Mac as _};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString};
use sha2::Sha256;

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// base64url without padding, appended to `out`.
fn b64url_into(data: &[u8], out: &mut String) {
    out.reserve(data.len().div_ceil(3) * 4);
    let mut chunks = data.chunks_exact(3);
    for c in &mut chunks {
        let n = (u32::from(c[0]) << 16) | (u32::from(c[1]) << 8) | u32::from(c[2]);
        for shift in [18, 12, 6, 0] {
            out.push(B64URL[((n >> shift) & 63) as usize] as char);
        }
    }
    match *chunks.remainder() {
        [a] => {
            let n = u32::from(a) << 16;
            out.push(B64URL[((n >> 18) & 63) as usize] as char);
            out.push(B64URL[((n >> 12) & 63) as usize] as char);
        }
        [a, b] => {
            let n = (u32::from(a) << 16) | (u32::from(b) << 8);
            out.push(B64URL[((n >> 18) & 63) as usize] as char);
            out.push(B64URL[((n >> 12) & 63) as usize] as char);
            out.push(B64URL[((n >> 6) & 63) as usize] as char);
        }
        _ => {}
    }
}

/// The bytes of a `str` (UTF-8) or `bytes` item; `None` for anything else or a `str`
/// that has no UTF-8 form (a lone surrogate).
fn item_bytes<'a>(item: &'a Bound<'_, PyAny>) -> Option<&'a [u8]> {
    if let Ok(s) = item.cast::<PyString>() {
        return s.to_str().ok().map(str::as_bytes);
    }
    if let Ok(b) = item.cast::<PyBytes>() {
        return Some(b.as_bytes());
    }
    None
}

/// HMAC-SHA256 under one key, every message starting with the same prefix.
#[pyclass(frozen, module = "streams_core")]
struct Mac {
    keyed: Hmac<Sha256>, // key schedule and prefix absorbed: cloned per value
}

impl Mac {
    fn digest(&self, message: &[u8]) -> [u8; 32] {
        let mut mac = self.keyed.clone();
        mac.update(message);
        mac.finalize().into_bytes().into()
    }
}

#[pymethods]
impl Mac {
    #[new]
    fn new(key: &[u8], prefix: &[u8]) -> PyResult<Self> {
        let mut keyed = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
            .map_err(|_| PyValueError::new_err("HMAC key of an unusable length"))?;
        keyed.update(prefix);
        Ok(Mac { keyed })
    }

    /// The 32-byte digest of each value (`str` as UTF-8, or `bytes`); `None` for a value it declines.
    fn digests<'py>(&self, py: Python<'py>, values: &Bound<'py, PyList>) -> PyResult<Bound<'py, PyList>> {
        let mut out: Vec<Bound<'py, PyAny>> = Vec::with_capacity(values.len());
        for item in values.iter() {
            out.push(match item_bytes(&item) {
                Some(message) => PyBytes::new(py, &self.digest(message)).into_any(),
                None => py.None().into_bound(py),
            });
        }
        PyList::new(py, out)
    }

    /// `head + base64url(digest)` of each value, as `str`; `None` for a value it declines.
    fn tokens<'py>(&self, py: Python<'py>, head: &str, values: &Bound<'py, PyList>) -> PyResult<Bound<'py, PyList>> {
        let mut out: Vec<Bound<'py, PyAny>> = Vec::with_capacity(values.len());
        let mut text = String::with_capacity(head.len() + 44);
        for item in values.iter() {
            out.push(match item_bytes(&item) {
                Some(message) => {
                    text.clear();
                    text.push_str(head);
                    b64url_into(&self.digest(message), &mut text);
                    PyString::new(py, &text).into_any()
                }
                None => py.None().into_bound(py),
            });
        }
        PyList::new(py, out)
    }
}

enum SivKey {
    Aes128(Box<Aes128Siv>), // a 32-byte key
    Aes256(Box<Aes256Siv>), // a 64-byte key
}

impl SivKey {
    fn encrypt(&mut self, headers: &[&[u8]], plaintext: &[u8]) -> Option<Vec<u8>> {
        match self {
            SivKey::Aes128(siv) => siv.encrypt(headers, plaintext).ok(),
            SivKey::Aes256(siv) => siv.encrypt(headers, plaintext).ok(),
        }
    }
}

/// How `seal` pads a plaintext before sealing it.
enum Pad {
    None,              // sealed as it is
    Block(usize),      // to the next multiple of a block
    Sizes(Vec<usize>), // to the smallest of these sizes (ascending) that holds it
}

impl Pad {
    /// An int (0: none, N: blocks of N) or a list of ascending sizes.
    fn from_py(pad: &Bound<'_, PyAny>) -> PyResult<Self> {
        if let Ok(block) = pad.extract::<usize>() {
            return Ok(if block == 0 { Pad::None } else { Pad::Block(block) });
        }
        let sizes: Vec<usize> = pad.extract()?;
        if sizes.is_empty() || sizes.windows(2).any(|w| w[0] >= w[1]) {
            return Err(PyValueError::new_err("pad sizes must be a non-empty ascending list"));
        }
        Ok(Pad::Sizes(sizes))
    }

    /// `len` (2 bytes, big-endian), the data, zeros to the padded size; false when it does
    /// not fit (a length over 2 bytes, or over the largest size).
    fn pad_into(&self, data: &[u8], out: &mut Vec<u8>) -> bool {
        let Ok(size) = u16::try_from(data.len()) else {
            return false;
        };
        out.clear();
        out.extend_from_slice(&size.to_be_bytes());
        out.extend_from_slice(data);
        let framed = out.len();
        let target = match self {
            Pad::None => framed,
            Pad::Block(block) => framed.div_ceil(*block) * block,
            Pad::Sizes(sizes) => match sizes.iter().find(|&&s| s >= framed) {
                Some(&s) => s,
                None => return false,
            },
        };
        out.resize(target, 0);
        true
    }
}

/// One part of a composed associated-data item (`Siv.seal`'s `ad_parts`).
enum AdPart<'py> {
    Same(Vec<u8>),             // the same bytes for every value
    Each(Bound<'py, PyList>), // value i's own item
}

impl<'py> AdPart<'py> {
    fn all(parts: &Bound<'py, PyList>, n: usize) -> PyResult<Vec<Self>> {
        parts
            .iter()
            .map(|part| {
                if let Ok(bytes) = part.cast::<PyBytes>() {
                    return Ok(AdPart::Same(bytes.as_bytes().to_vec()));
                }
                match part.cast_into::<PyList>() {
                    Ok(items) if items.len() == n => Ok(AdPart::Each(items)),
                    _ => Err(PyValueError::new_err("an ad_parts part is bytes or a list of one item per plaintext")),
                }
            })
            .collect()
    }
}

/// AES-SIV keys by index (32 bytes: AES-128-SIV, 64 bytes: AES-256-SIV), schedules set once.
#[pyclass(module = "streams_core")]
struct Siv {
    keys: Vec<SivKey>,
}

#[pymethods]
impl Siv {
    #[new]
    fn new(keys: Vec<Vec<u8>>) -> PyResult<Self> {
        let keys = keys
            .iter()
            .map(|key| match key.len() {
                32 => Ok(SivKey::Aes128(Box::new(Aes128Siv::new_from_slice(key).expect("32 bytes")))),
                64 => Ok(SivKey::Aes256(Box::new(Aes256Siv::new_from_slice(key).expect("64 bytes")))),
                _ => Err(PyValueError::new_err("AES-SIV keys are 32 or 64 bytes")),
            })
            .collect::<PyResult<Vec<_>>>()?;
        Ok(Siv { keys })
    }

    /// Seal each plaintext: `AES-SIV(key, ad_shared + [ad_each[i]], pad(plaintext))`.
    ///
    /// `key_index` is one index for the batch or one per value; `pad_block` 0 seals the
    /// plaintext as it is, N > 0 pads it like masking.pad (2-byte length, zeros to a
    /// multiple of N), a list of ascending sizes pads it like masking.pad_field (2-byte
    /// length, zeros to the smallest size that holds it; a value over the largest is
    /// declined). `ad_each` (or None) holds one `str`/`bytes` item per value. With `head`
    /// the result is `head + base64url(sealed)` (`str`), else the sealed `bytes`, after
    /// `prefix_each[i]` when given. `ad_parts` (instead of `ad_each`) composes each value's
    /// own item: the concatenation of the parts, a `bytes` part the same for every value, a
    /// list part giving value i its i-th item (`str` as UTF-8, or `bytes`). `None` stands
    /// for a value it declines (also where an item of `ad_each` or a list part is `None`).
    #[pyo3(signature = (key_index, plaintexts, pad_block, ad_shared, ad_each=None, head=None, prefix_each=None, ad_parts=None))]
    #[allow(clippy::too_many_arguments)]
    fn seal<'py>(
        &mut self,
        py: Python<'py>,
        key_index: &Bound<'py, PyAny>,
        plaintexts: &Bound<'py, PyList>,
        pad_block: &Bound<'py, PyAny>,
        ad_shared: Vec<Vec<u8>>,
        ad_each: Option<&Bound<'py, PyList>>,
        head: Option<&str>,
        prefix_each: Option<&Bound<'py, PyList>>,
        ad_parts: Option<&Bound<'py, PyList>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let n = plaintexts.len();
        let pad = Pad::from_py(pad_block)?;
        let per_value: Option<Vec<usize>> = match key_index.extract::<usize>() {
            Ok(_) => None,
            Err(_) => Some(key_index.extract::<Vec<usize>>()?),
        };
        let single = if per_value.is_none() { key_index.extract::<usize>()? } else { 0 };
        let parts = match ad_parts {
            Some(parts) => Some(AdPart::all(parts, n)?),
            None => None,
        };
        if per_value.as_ref().is_some_and(|v| v.len() != n)
            || ad_each.is_some_and(|a| a.len() != n)
            || prefix_each.is_some_and(|p| p.len() != n)
            || (ad_each.is_some() && parts.is_some())
        {
            return Err(PyValueError::new_err(
                "key_index, ad_each and prefix_each need one item per plaintext; ad_each or ad_parts, not both",
            ));
        }
        let mut padded = Vec::with_capacity(256);
        let mut joined: Vec<u8> = Vec::with_capacity(1024);
        let mut text = String::new();
        let mut item_ad: Vec<u8> = Vec::with_capacity(256);
        let mut out: Vec<Bound<'py, PyAny>> = Vec::with_capacity(n);
        for (i, item) in plaintexts.iter().enumerate() {
            let index = per_value.as_ref().map_or(single, |v| v[i]);
            let each = ad_each.map(|a| a.get_item(i)).transpose()?;
            let prefix = prefix_each.map(|p| p.get_item(i)).transpose()?;
            let sealed = (|| {
                let plaintext = item_bytes(&item)?;
                let key = self.keys.get_mut(index)?;
                let mut headers: Vec<&[u8]> = Vec::with_capacity(ad_shared.len() + 1);
                headers.extend(ad_shared.iter().map(Vec::as_slice));
                if let Some(each) = each.as_ref() {
                    headers.push(item_bytes(each)?);
                }
                if let Some(parts) = parts.as_ref() {
                    item_ad.clear();
                    for part in parts {
                        match part {
                            AdPart::Same(bytes) => item_ad.extend_from_slice(bytes),
                            AdPart::Each(items) => item_ad.extend_from_slice(item_bytes(&items.get_item(i).ok()?)?),
                        }
                    }
                    headers.push(&item_ad);
                }
                if let Pad::None = pad {
                    return key.encrypt(&headers, plaintext);
                }
                if !pad.pad_into(plaintext, &mut padded) {
                    return None;
                }
                key.encrypt(&headers, &padded)
            })();
            let prefix = match prefix.as_ref() {
                Some(p) => match item_bytes(p) {
                    Some(bytes) => Some(bytes),
                    None => {
                        out.push(py.None().into_bound(py)); // an unusable prefix: declined
                        continue;
                    }
                },
                None => None,
            };
            out.push(match (sealed, head) {
                (None, _) => py.None().into_bound(py),
                (Some(sealed), None) => match prefix {
                    Some(prefix) => {
                        joined.clear();
                        joined.extend_from_slice(prefix);
                        joined.extend_from_slice(&sealed);
                        PyBytes::new(py, &joined).into_any()
                    }
                    None => PyBytes::new(py, &sealed).into_any(),
                },
                (Some(sealed), Some(head)) => {
                    text.clear();
                    text.push_str(head);
                    b64url_into(&sealed, &mut text);
                    PyString::new(py, &text).into_any()
                }
            });
        }
        PyList::new(py, out)
    }
}


// --- copy_binary: rows for PostgreSQL's binary COPY ------------------------------------------

const COPY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// PostgreSQL's binary COPY stream (`COPY ... FROM STDIN (FORMAT binary)`) of the rows
/// whose columns are `columns`: lists of one length, each item `str` (sent as UTF-8: a
/// `text` column) or `bytes` (a `bytea` column). `None` when it declines (lists of
/// different lengths, an item of another type, a `str` with no UTF-8 form, a value over
/// a field's 4-byte length): the caller writes those rows its own way.
#[pyfunction]
fn copy_binary<'py>(py: Python<'py>, columns: Vec<Bound<'py, PyList>>) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let rows = columns.first().map_or(0, |c| c.len());
    let Ok(fields) = i16::try_from(columns.len()) else {
        return Ok(None);
    };
    if columns.iter().any(|c| c.len() != rows) {
        return Ok(None);
    }
    let mut out: Vec<u8> = Vec::with_capacity(COPY_SIGNATURE.len() + 10 + rows * (2 + columns.len() * 48));
    out.extend_from_slice(COPY_SIGNATURE);
    out.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
    out.extend_from_slice(&0i32.to_be_bytes()); // no header extension
    for row in 0..rows {
        out.extend_from_slice(&fields.to_be_bytes());
        for column in &columns {
            let item = column.get_item(row)?;
            let Some(data) = item_bytes(&item) else {
                return Ok(None);
            };
            let Ok(size) = i32::try_from(data.len()) else {
                return Ok(None);
            };
            out.extend_from_slice(&size.to_be_bytes());
            out.extend_from_slice(data);
        }
    }
    out.extend_from_slice(&(-1i16).to_be_bytes()); // trailer
    Ok(Some(PyBytes::new(py, &out)))
}

// --- parse: raw envelope + login body, the common shape only --------------------------------

const TS_MIN: i64 = -62_135_596_800_000; // years 1 to 9999, as the reference's decoder allows
const TS_MAX: i64 = 253_402_300_799_999;
const MAX_MESSAGE_ID: usize = 128;
const INT32_MAX: u64 = (1 << 31) - 1;

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A zig-zag varint of at most 10 bytes that fits an i64 (anything else: decline).
    fn long(&mut self) -> Option<i64> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self.data.get(self.pos)?;
            self.pos += 1;
            if shift == 63 && b > 1 {
                return None;
            }
            n |= u64::from(b & 0x7F) << shift;
            if b & 0x80 == 0 {
                return Some(((n >> 1) as i64) ^ -((n & 1) as i64));
            }
        }
        None
    }

    fn string(&mut self) -> Option<&'a str> {
        let n = usize::try_from(self.long()?).ok()?;
        let end = self.pos.checked_add(n)?;
        let bytes = self.data.get(self.pos..end)?;
        self.pos = end;
        std::str::from_utf8(bytes).ok()
    }
}

/// `(message_id, sent_at, body)` of a RawEnvelope v1 datum after `header`, its attributes
/// checked and skipped, nothing after it.
fn envelope<'a>(data: &'a [u8], headers: &[Vec<u8>]) -> Option<(&'a str, i64, &'a str)> {
    let rest = headers.iter().find_map(|h| data.strip_prefix(h.as_slice()))?;
    let mut r = Reader { data: rest, pos: 0 };
    let message_id = r.string()?;
    let sent_at = r.long()?;
    if !(TS_MIN..=TS_MAX).contains(&sent_at) {
        return None;
    }
    let body = r.string()?;
    loop {
        let count = r.long()?;
        if count == 0 {
            break;
        }
        if count < 0 {
            return None; // blocks with a byte size: the reference's
        }
        for _ in 0..count {
            r.string()?;
            r.string()?;
        }
    }
    (r.pos == rest.len()).then_some((message_id, sent_at, body))
}

#[derive(Clone, Copy)]
enum Json<'a> {
    Str(&'a str),
    Null,
}

/// A flat JSON object of strings and nulls, ASCII, without escapes or control characters,
/// with unique keys; anything else (valid or not) is declined.
fn flat_object(body: &str) -> Option<Vec<(&str, Json<'_>)>> {
    let b = body.as_bytes();
    if !body.is_ascii() || b.contains(&b'\\') {
        return None;
    }
    let ws = |i: &mut usize| {
        while *i < b.len() && matches!(b[*i], b' ' | b'\t' | b'\n' | b'\r') {
            *i += 1;
        }
    };
    let string = |i: &mut usize| -> Option<&str> {
        if b.get(*i) != Some(&b'"') {
            return None;
        }
        let start = *i + 1;
        let len = b[start..].iter().position(|&c| c == b'"' || c < 0x20)?;
        if b[start + len] != b'"' {
            return None;
        }
        *i = start + len + 1;
        Some(&body[start..start + len])
    };
    let mut i = 0;
    let mut pairs: Vec<(&str, Json<'_>)> = Vec::with_capacity(8);
    ws(&mut i);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    ws(&mut i);
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            ws(&mut i);
            let key = string(&mut i)?;
            ws(&mut i);
            if b.get(i) != Some(&b':') {
                return None;
            }
            i += 1;
            ws(&mut i);
            let value = if b[i..].starts_with(b"null") {
                i += 4;
                Json::Null
            } else {
                Json::Str(string(&mut i)?)
            };
            if pairs.iter().any(|(k, _)| *k == key) {
                return None;
            }
            pairs.push((key, value));
            ws(&mut i);
            match b.get(i) {
                Some(b',') => i += 1,
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    ws(&mut i);
    (i == b.len()).then_some(pairs)
}

fn field<'a>(pairs: &[(&'a str, Json<'a>)], name: &str) -> Option<Json<'a>> {
    pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
}

/// A required field: a string within `limit` characters, not blank (ASCII: only spaces
/// can be blank here, control characters were declined).
fn required<'a>(pairs: &[(&'a str, Json<'a>)], name: &str, limit: usize) -> Option<&'a str> {
    match field(pairs, name)? {
        Json::Str(s) if s.len() <= limit && !s.trim_matches(' ').is_empty() => Some(s),
        _ => None,
    }
}

fn octet(s: &str) -> bool {
    // 25[0-5] | 2[0-4][0-9] | 1[0-9][0-9] | [1-9]?[0-9]: no leading zero, like ipaddress
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 3 || !b.iter().all(u8::is_ascii_digit) || (b.len() > 1 && b[0] == b'0') {
        return false;
    }
    s.parse::<u16>().is_ok_and(|n| n <= 255)
}

/// ipaddress.IPv6Address's parse of a hex-only address (no embedded IPv4, no scope id),
/// rule for rule (CPython 3.11 `_ip_int_from_string`); None when it would refuse it.
fn ipv6_int(text: &str) -> Option<u128> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() < 3 || parts.len() > 9 {
        return None;
    }
    let mut skip = None;
    for (i, part) in parts.iter().enumerate().take(parts.len() - 1).skip(1) {
        if part.is_empty() {
            if skip.is_some() {
                return None;
            }
            skip = Some(i);
        }
    }
    let (hi, lo, skipped) = match skip {
        Some(index) => {
            let mut hi = index;
            let mut lo = parts.len() - index - 1;
            if parts[0].is_empty() {
                hi -= 1;
                if hi != 0 {
                    return None;
                }
            }
            if parts[parts.len() - 1].is_empty() {
                lo -= 1;
                if lo != 0 {
                    return None;
                }
            }
            let skipped = 8usize.checked_sub(hi + lo)?;
            if skipped < 1 {
                return None;
            }
            (hi, lo, skipped)
        }
        None => {
            if parts.len() != 8 || parts[0].is_empty() || parts[7].is_empty() {
                return None;
            }
            (8, 0, 0)
        }
    };
    let hextet = |s: &str| -> Option<u128> {
        if s.is_empty() || s.len() > 4 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        u16::from_str_radix(s, 16).ok().map(u128::from)
    };
    let mut n: u128 = 0;
    for part in &parts[..hi] {
        n = (n << 16) | hextet(part)?;
    }
    n = n.checked_shl(16 * skipped as u32).unwrap_or(0);
    for part in &parts[parts.len() - lo..] {
        n = (n << 16) | hextet(part)?;
    }
    Some(n)
}

/// ipaddress's text of an address: an IPv4-mapped one as its IPv4, else compressed IPv6
/// (lower-case hextets, the first longest run of two or more zero hextets as `::`).
fn ipv6_text(n: u128) -> String {
    if n >> 32 == 0xFFFF {
        let v4 = n as u32;
        return format!("{}.{}.{}.{}", v4 >> 24, (v4 >> 16) & 255, (v4 >> 8) & 255, v4 & 255);
    }
    let hextets: Vec<u16> = (0..8).rev().map(|i| (n >> (16 * i)) as u16).collect();
    let (mut best_start, mut best_len, mut start, mut len) = (0usize, 0usize, 0usize, 0usize);
    for (i, h) in hextets.iter().enumerate() {
        if *h == 0 {
            if len == 0 {
                start = i;
            }
            len += 1;
            if len > best_len {
                best_len = len;
                best_start = start;
            }
        } else {
            len = 0;
        }
    }
    let text = |hs: &[u16]| hs.iter().map(|h| format!("{h:x}")).collect::<Vec<_>>().join(":");
    if best_len > 1 {
        format!("{}::{}", text(&hextets[..best_start]), text(&hextets[best_start + best_len..]))
    } else {
        text(&hextets)
    }
}

/// `(canonical, is an IP)` where the answer is certain: a dotted quad, a hex-only IPv6
/// address, or text that cannot be an IP (no colon, not a dotted quad). IPv6 with an
/// embedded IPv4 or a scope id, or anything else with a colon, is declined.
fn canonical_ip(text: &str) -> Option<(Cow<'_, str>, bool)> {
    let t = text.trim_matches(' ');
    if t.contains(':') {
        if t.contains('.') || t.contains('%') || t.contains('/') {
            return None;
        }
        return ipv6_int(t).map(|n| (Cow::Owned(ipv6_text(n)), true));
    }
    let parts: Vec<&str> = t.split('.').collect();
    Some((Cow::Borrowed(t), parts.len() == 4 && parts.iter().all(|p| octet(p))))
}

/// mask.encode_app_version: `major*10^6 + minor*10^3 + patch`, or None.
fn app_version_number(text: &str) -> Option<u64> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.is_empty() || parts.len() > 3 {
        return None;
    }
    let mut numbers = [0u64; 3];
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() || !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let digits = part.trim_start_matches('0');
        numbers[i] = if digits.is_empty() { 0 } else if digits.len() > 12 { u64::MAX } else { digits.parse().ok()? };
    }
    if numbers[1] > 999 || numbers[2] > 999 {
        return None;
    }
    let value = numbers[0].checked_mul(1_000_000)?.checked_add(numbers[1] * 1_000 + numbers[2])?;
    (value <= INT32_MAX).then_some(value)
}

type Parsed<'a> = (&'a str, i64, &'a str, &'a str, Cow<'a, str>, bool, &'a str, &'a str, Option<u64>, Option<&'a str>);

fn parse_one<'a>(data: &'a [u8], headers: &[Vec<u8>]) -> Option<Parsed<'a>> {
    let (message_id, sent_at, body) = envelope(data, headers)?;
    let id_chars = message_id.chars().count();
    if id_chars == 0 || id_chars > MAX_MESSAGE_ID {
        return None;
    }
    let pairs = flat_object(body)?;
    let user_id = required(&pairs, "user_id", 128)?;
    let device_type = required(&pairs, "device_type", 32)?;
    let ip = required(&pairs, "ip", 200)?;
    let device_id = required(&pairs, "device_id", 200)?;
    let app_version = required(&pairs, "app_version", 64)?;
    let locale = match field(&pairs, "locale")? {
        Json::Null => None,
        Json::Str(s) if s.len() <= 32 => Some(s),
        Json::Str(_) => return None,
    };
    let (ip_canonical, ip_is_valid) = canonical_ip(ip)?;
    let device_canonical = device_id.trim_matches(' ');
    let number = app_version_number(app_version);
    Some((message_id, sent_at, user_id, device_type, ip_canonical, ip_is_valid, device_canonical, app_version, number, locale))
}

/// Parse a batch of raw records written with one of `headers` (the writer schema's
/// single-object and Confluent headers, RawEnvelope v1 layout): for each, the tuple
/// `(message_id, sent_at, user_id, device_type, ip (canonical), ip_is_valid, device_id
/// (canonical), app_version, app_version number or None, locale or None)`, or `None`
/// where it declines (any record that is not the plain common shape: the reference
/// decides those, valid or not).
#[pyfunction]
fn parse_logins<'py>(py: Python<'py>, values: &Bound<'py, PyList>, headers: Vec<Vec<u8>>) -> PyResult<Bound<'py, PyList>> {
    let mut out: Vec<Bound<'py, PyAny>> = Vec::with_capacity(values.len());
    for item in values.iter() {
        let parsed = item.cast::<PyBytes>().ok().and_then(|b| parse_one(b.as_bytes(), &headers).map(|p| p.into_pyobject(py)));
        out.push(match parsed {
            Some(tuple) => tuple?.into_any(),
            None => py.None().into_bound(py),
        });
    }
    PyList::new(py, out)
}

#[pymodule]
fn streams_core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Mac>()?;
    m.add_class::<Siv>()?;
    m.add_class::<dedup::DedupWindow>()?;
    m.add_class::<avro::RecordEncoder>()?;
    m.add_function(wrap_pyfunction!(parse_logins, m)?)?;
    m.add_function(wrap_pyfunction!(copy_binary, m)?)?;
    m.add_function(wrap_pyfunction!(stage::stage_input, m)?)?;
    Ok(())
}
