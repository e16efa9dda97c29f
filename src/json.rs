//! JSON in and out without a value tree.
//!
//! In: [`Body`] validates a request body with simd-json (on a padded scratch copy, since simd-json
//! unescapes strings in place) and reads top-level members from its tape. [`member_value_spans`]
//! finds where each top-level value sits in the *original* bytes, so an event payload is stored
//! and served as the exact bytes that arrived: validated, never re-serialized. A number too wide
//! for simd-json's 64-bit floats (`1e400`) is JSON all the same: such a body is parsed again with
//! those numbers read as `1e300`.
//!
//! Out: [`Obj`] writes an object straight into a response buffer.

use std::ops::Range;

use simd_json::{Buffers, Node, StaticNode, Tape};

/// Why a body is not usable JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    /// Not valid JSON; the text says where.
    Invalid(String),
    /// Valid JSON, but the root is not an object.
    NotAnObject,
}

/// Per-core parse state, reused across requests so a parse allocates nothing once warm.
pub struct Parser {
    buffers: Buffers,
    scratch: Vec<u8>,
}

impl Default for Parser {
    fn default() -> Self {
        Parser {
            buffers: Buffers::new(4096),
            scratch: Vec::with_capacity(4096),
        }
    }
}

impl Parser {
    /// Validate `body` as a JSON object and hand its top level to `f`.
    pub fn with_object<R>(
        &mut self,
        body: &[u8],
        f: impl FnOnce(&Body<'_>) -> R,
    ) -> Result<R, JsonError> {
        self.copy(body, &[]);
        let mut tape = Tape::null();
        let first = fill(&mut self.scratch, body.len(), &mut self.buffers, &mut tape);
        let refused = match first {
            Ok(()) => return object(&tape, f),
            Err(e) => e,
        };
        drop(tape);
        // Numbers beyond a 64-bit float's range, which simd-json refuses (valid JSON all the
        // same; stored and served as received): read as `1e300` in a second copy parsed.
        self.widened(body, &refused)?;
        let mut tape = Tape::null();
        fill(&mut self.scratch, body.len(), &mut self.buffers, &mut tape)
            .map_err(|e| JsonError::Invalid(describe(&e, body)))?;
        object(&tape, f)
    }

    /// `body` into the scratch copy simd-json parses (and unescapes in place), its `wide`
    /// numbers read as [`WIDE_AS`], padded as simd-json needs.
    fn copy(&mut self, body: &[u8], wide: &[Range<usize>]) {
        self.scratch.clear();
        self.scratch.extend_from_slice(body);
        for r in wide {
            let sign = usize::from(self.scratch[r.start] == b'-');
            let token = &mut self.scratch[r.start + sign..r.end];
            token.fill(b' ');
            token[..WIDE_AS.len()].copy_from_slice(WIDE_AS);
        }
        self.scratch
            .resize(body.len() + simd_json::INPUT_PADDING, 0);
    }

    /// For a `body` simd-json `refused` for a number: the scratch copy with its numbers too wide
    /// for a float widened, to be parsed again, or why it is not JSON.
    #[cold]
    #[inline(never)]
    fn widened(&mut self, body: &[u8], refused: &simd_json::Error) -> Result<(), JsonError> {
        let number = matches!(
            refused.error(),
            simd_json::ErrorType::InvalidNumber
                | simd_json::ErrorType::InvalidExponent
                | simd_json::ErrorType::Overflow
        );
        let wide = if number {
            wide_numbers(body)
        } else {
            Vec::new()
        };
        if wide.is_empty() {
            return Err(JsonError::Invalid(describe(refused, body)));
        }
        self.copy(body, &wide);
        Ok(())
    }
}

/// simd-json's parse of `scratch[..len]` onto `tape`: out of line, called from each of
/// [`Parser::with_object`]'s instances (one per kind of body), twice.
#[inline(never)]
fn fill<'de>(
    scratch: &'de mut [u8],
    len: usize,
    buffers: &mut Buffers,
    tape: &mut Tape<'de>,
) -> simd_json::Result<()> {
    simd_json::fill_tape_padded(scratch, len, buffers, tape)
}

/// `f` of the object a parse left on `tape`, or [`JsonError::NotAnObject`].
fn object<R>(tape: &Tape<'_>, f: impl FnOnce(&Body<'_>) -> R) -> Result<R, JsonError> {
    let nodes = &tape.0;
    match nodes.first() {
        Some(Node::Object { .. }) => Ok(f(&Body { nodes })),
        _ => Err(JsonError::NotAnObject),
    }
}

/// What a number too wide for a 64-bit float is read as (after its sign): as wide as the shortest
/// such number (`1e309`), and still a number no field that is validated takes.
const WIDE_AS: &[u8] = b"1e300";

/// The numbers of `body` (outside its strings, as JSON's grammar has them) whose value is beyond
/// a 64-bit float's range. Cold: only a body that simd-json refused for a number is scanned.
#[cold]
fn wide_numbers(body: &[u8]) -> Vec<Range<usize>> {
    let mut wide = Vec::new();
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => i = skip_string(body, i).unwrap_or(body.len()),
            b'-' | b'0'..=b'9' => {
                let end = body[i..]
                    .iter()
                    .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                    .map_or(body.len(), |n| i + n);
                let token = &body[i..end];
                let sign = usize::from(token[0] == b'-');
                if is_number(token)
                    && magnitude(token) >= WIDE_FROM
                    && token.len() >= sign + WIDE_AS.len()
                {
                    wide.push(i..end);
                }
                i = end;
            }
            _ => i += 1,
        }
    }
    wide
}

/// The decimal [`magnitude`] from which a number is taken as too wide for a 64-bit float: 1e308
/// and up (a float's largest is 1.797…e308; the few finite ones taken too read as numbers all the
/// same).
const WIDE_FROM: i64 = 309;

/// The decimal magnitude of `token`, a number ([`is_number`]): the `m` of `0.d… × 10^m` with its
/// first digit `d` not zero (`i64::MIN` for zero); no float is parsed.
fn magnitude(token: &[u8]) -> i64 {
    let token = token.strip_prefix(b"-").unwrap_or(token);
    let (mantissa, exponent) = match token.iter().position(|b| matches!(b, b'e' | b'E')) {
        Some(e) => (&token[..e], &token[e + 1..]),
        None => (token, &b""[..]),
    };
    let whole = mantissa
        .iter()
        .position(|&b| b == b'.')
        .unwrap_or(mantissa.len());
    let Some(first) = mantissa.iter().position(|b| matches!(b, b'1'..=b'9')) else {
        return i64::MIN;
    };
    // Digits before the first one not zero, the point not counted.
    let zeros = first - usize::from(first > whole);
    let (negative, digits) = match exponent.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, exponent),
    };
    let exp = digits.iter().fold(0i64, |e, d| {
        e.saturating_mul(10).saturating_add(i64::from(d - b'0'))
    });
    let exp = if negative { -exp } else { exp };
    (whole as i64 - zeros as i64).saturating_add(exp)
}

/// Whether `token` is a number as JSON's grammar has it: `-`? (`0` | [1-9][0-9]*) (`.`[0-9]+)?
/// ([eE][+-]?[0-9]+)?
fn is_number(token: &[u8]) -> bool {
    let digits = |at: usize| {
        token[at.min(token.len())..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count()
    };
    let mut i = usize::from(token.first() == Some(&b'-'));
    match digits(i) {
        0 => return false,
        n if n > 1 && token[i] == b'0' => return false,
        n => i += n,
    }
    if token.get(i) == Some(&b'.') {
        match digits(i + 1) {
            0 => return false,
            n => i += 1 + n,
        }
    }
    if matches!(token.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(token.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        match digits(i) {
            0 => return false,
            n => i += n,
        }
    }
    i == token.len()
}

/// Where the first `\u` escape of `body` that is half of a UTF-16 surrogate pair without its other
/// half starts (a "lone surrogate": no character; I-JSON, RFC 7493, refuses it, as do many
/// receivers' parsers and PostgreSQL's `jsonb`).
#[cold]
fn lone_surrogate(body: &[u8]) -> Option<usize> {
    let unit = |at: usize| {
        body.get(at + 2..at + 6).and_then(|h| {
            h.iter()
                .try_fold(0u32, |u, &b| char::from(b).to_digit(16).map(|d| u << 4 | d))
        })
    };
    let mut i = 0;
    while i < body.len() {
        if body[i] != b'"' {
            i += 1;
            continue;
        }
        let mut lone = None;
        // A high half waiting for its low half, which must be the very next escape.
        let mut high: Option<usize> = None;
        let end = string_end(body, i, |at| {
            let u = unit(at).unwrap_or(0);
            match high.take() {
                // The pair's low half.
                Some(h) if at == h + 6 && (0xDC00..0xE000).contains(&u) => return,
                Some(h) => _ = lone.get_or_insert(h),
                None => {}
            }
            match u {
                0xD800..=0xDBFF => high = Some(at),
                0xDC00..=0xDFFF => _ = lone.get_or_insert(at),
                _ => {}
            }
        });
        if let Some(at) = lone.or(high) {
            return Some(at);
        }
        i = end.unwrap_or(body.len());
    }
    None
}

fn describe(e: &simd_json::Error, body: &[u8]) -> String {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return "request body is empty; a JSON object was expected".into();
    }
    let at = e.index();
    if matches!(e.error(), simd_json::ErrorType::DepthLimitExceeded) {
        return format!(
            "request body nests arrays and objects more than {} deep (the most this server \
             reads) near byte {at}",
            simd_json::DEFAULT_MAX_DEPTH
        );
    }
    if matches!(e.error(), simd_json::ErrorType::InvalidUnicodeCodepoint) {
        // simd-json does not say where (its index is 0).
        if let Some(at) = lone_surrogate(body) {
            return format!(
                "request body is not valid JSON: a \\u escape is half of a UTF-16 surrogate pair \
                 without the other half (no character) near byte {at}"
            );
        }
    }
    // simd-json reports some syntax errors (a stray control byte, say) as its own "internal"
    // or "parser" error: to the client they are the body's fault, and read so.
    if matches!(
        e.error(),
        simd_json::ErrorType::InternalError
            | simd_json::ErrorType::Parser
            | simd_json::ErrorType::NoStructure
    ) {
        return format!("request body is not valid JSON: syntax error near byte {at}");
    }
    let kind = format!("{:?}", e.error());
    let words = kind
        .chars()
        .flat_map(|c| {
            let lower = c.to_ascii_lowercase();
            if c.is_ascii_uppercase() {
                vec![' ', lower]
            } else {
                vec![c]
            }
        })
        .collect::<String>();
    let words = words.trim();
    let words: String = words.split('(').next().unwrap_or(words).trim().to_string();
    format!("request body is not valid JSON: {words} near byte {at}")
}

/// A field value as far as validation needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Field<'a> {
    /// A string, unescaped.
    Str(&'a str),
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// An integer that fits an i64.
    Int(i64),
    /// Any other number.
    Number,
    /// An object; `first` is the tape index of its first member's name.
    Object {
        /// Tape index of the first member's name.
        first: usize,
        /// Number of members.
        len: usize,
    },
    /// An array; `first` is the tape index of its first element.
    Array {
        /// Tape index of the first element.
        first: usize,
        /// Number of elements.
        len: usize,
    },
}

impl Field<'_> {
    /// The JSON type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Field::Str(_) => "a string",
            Field::Null => "null",
            Field::Bool(_) => "a boolean",
            Field::Int(_) | Field::Number => "a number",
            Field::Object { .. } => "an object",
            Field::Array { .. } => "an array",
        }
    }
}

/// The top level of a validated JSON object.
pub struct Body<'t> {
    nodes: &'t [Node<'t>],
}

impl<'t> Body<'t> {
    /// The value of member `name`; with repeated names the last one wins, as in most parsers.
    pub fn get(&self, name: &str) -> Option<Field<'t>> {
        let mut found = None;
        self.for_each_member(|i, key, field| {
            if key == name {
                found = Some((i, field));
            }
        });
        found.map(|(_, f)| f)
    }

    /// The member index (document order) of the last member named `name`.
    pub fn member_index(&self, name: &str) -> Option<usize> {
        let mut found = None;
        self.for_each_member(|i, key, _| {
            if key == name {
                found = Some(i);
            }
        });
        found
    }

    /// The elements of an array field, each a `Field`.
    pub fn array_items(&self, field: Field<'t>) -> Vec<Field<'t>> {
        let Field::Array { first, len } = field else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(len);
        let mut i = first;
        for _ in 0..len {
            out.push(self.field_at(i));
            i = self.skip(i);
        }
        out
    }

    /// The members of an object field, each a name and a `Field`, in document order (a name
    /// repeated is there each time).
    pub fn object_members(&self, field: Field<'t>) -> Vec<(&'t str, Field<'t>)> {
        let Field::Object { first, len } = field else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(len);
        self.members_from(first, len, |_, key, value| out.push((key, value)));
        out
    }

    fn for_each_member(&self, f: impl FnMut(usize, &'t str, Field<'t>)) {
        let Some(Node::Object { len, .. }) = self.nodes.first() else {
            return;
        };
        self.members_from(1, *len, f);
    }

    /// Visit `len` members whose first name is at tape index `first`.
    fn members_from(&self, first: usize, len: usize, mut f: impl FnMut(usize, &'t str, Field<'t>)) {
        let mut i = first;
        for member in 0..len {
            let key = match self.nodes.get(i) {
                Some(Node::String(k)) => *k,
                _ => return,
            };
            let value = i + 1;
            f(member, key, self.field_at(value));
            i = self.skip(value);
        }
    }

    fn field_at(&self, i: usize) -> Field<'t> {
        match self.nodes.get(i) {
            Some(Node::String(s)) => Field::Str(s),
            Some(Node::Object { len, .. }) => Field::Object {
                first: i + 1,
                len: *len,
            },
            Some(Node::Array { len, .. }) => Field::Array {
                first: i + 1,
                len: *len,
            },
            Some(Node::Static(StaticNode::Null)) | None => Field::Null,
            Some(Node::Static(StaticNode::Bool(b))) => Field::Bool(*b),
            Some(Node::Static(StaticNode::I64(n))) => Field::Int(*n),
            Some(Node::Static(StaticNode::U64(n))) if i64::try_from(*n).is_ok() => {
                Field::Int(*n as i64)
            }
            Some(Node::Static(_)) => Field::Number,
        }
    }

    /// The tape index just past the value at `i`.
    fn skip(&self, i: usize) -> usize {
        match self.nodes.get(i) {
            Some(Node::Object { count, .. }) | Some(Node::Array { count, .. }) => i + count + 1,
            _ => i + 1,
        }
    }
}

/// Byte ranges of the values of a top-level object's members, in document order, in `json` as
/// received. `json` must already be valid JSON with an object root (see [`Parser`]); `None` if it
/// is not, so a disagreement between the two scanners is an error, never a panic.
pub fn member_value_spans(json: &[u8]) -> Option<Vec<Range<usize>>> {
    let mut spans = Vec::with_capacity(4);
    let mut i = skip_ws(json, 0);
    if *json.get(i)? != b'{' {
        return None;
    }
    i = skip_ws(json, i + 1);
    if *json.get(i)? == b'}' {
        return Some(spans);
    }
    loop {
        i = skip_string(json, i)?;
        i = skip_ws(json, i);
        if *json.get(i)? != b':' {
            return None;
        }
        let start = skip_ws(json, i + 1);
        let end = skip_value(json, start)?;
        spans.push(start..end);
        i = skip_ws(json, end);
        match *json.get(i)? {
            b',' => i = skip_ws(json, i + 1),
            b'}' => return Some(spans),
            _ => return None,
        }
    }
}

/// Byte ranges of the elements of the array at `span` of `json` (valid JSON, see
/// [`member_value_spans`]), in order; `None` if `span` does not hold an array.
pub fn array_element_spans(json: &[u8], span: Range<usize>) -> Option<Vec<Range<usize>>> {
    let json = json.get(..span.end)?;
    let mut spans = Vec::new();
    let mut i = skip_ws(json, span.start);
    if *json.get(i)? != b'[' {
        return None;
    }
    i = skip_ws(json, i + 1);
    if *json.get(i)? == b']' {
        return Some(spans);
    }
    loop {
        let end = skip_value(json, i)?;
        spans.push(i..end);
        i = skip_ws(json, end);
        match *json.get(i)? {
            b',' => i = skip_ws(json, i + 1),
            b']' => return Some(spans),
            _ => return None,
        }
    }
}

fn skip_ws(json: &[u8], mut i: usize) -> usize {
    while matches!(json.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// `json[i]` is an opening quote; returns the index after the closing one.
fn skip_string(json: &[u8], i: usize) -> Option<usize> {
    string_end(json, i, |_| {})
}

/// `json[i]` is an opening quote; returns the index after the closing one, and gives `escape`
/// where each `\u` escape in the string starts.
fn string_end(json: &[u8], i: usize, mut escape: impl FnMut(usize)) -> Option<usize> {
    if *json.get(i)? != b'"' {
        return None;
    }
    let mut j = i + 1;
    loop {
        match *json.get(j)? {
            b'\\' => {
                if json.get(j + 1) == Some(&b'u') {
                    escape(j);
                }
                j += 2;
            }
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
}

fn skip_value(json: &[u8], i: usize) -> Option<usize> {
    match *json.get(i)? {
        b'"' => skip_string(json, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match *json.get(j)? {
                    b'"' => {
                        j = skip_string(json, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while let Some(b) = json.get(j) {
                if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

/// Append a JSON array of `items`, each written by `write`.
pub fn write_list<T>(
    out: &mut Vec<u8>,
    items: impl IntoIterator<Item = T>,
    mut write: impl FnMut(&mut Vec<u8>, T),
) {
    out.push(b'[');
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write(out, item);
    }
    out.push(b']');
}

/// Append `s` as a JSON string literal.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => {
                out.extend_from_slice(&bytes[start..i]);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 0xf) as usize]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Writes one JSON object member by member.
pub struct Obj<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Obj<'a> {
    /// Open an object in `out`.
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Obj { out, first: true }
    }

    /// Write `"name":` and return the buffer for the value.
    pub fn key(&mut self, name: &str) -> &mut Vec<u8> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        write_str(self.out, name);
        self.out.push(b':');
        self.out
    }

    /// A string member.
    pub fn str(&mut self, name: &str, value: &str) -> &mut Self {
        let out = self.key(name);
        write_str(out, value);
        self
    }

    /// A string member, or `null`.
    pub fn opt_str(&mut self, name: &str, value: Option<&str>) -> &mut Self {
        match value {
            Some(v) => self.str(name, v),
            None => self.null(name),
        }
    }

    /// A member whose value is already JSON text.
    pub fn raw(&mut self, name: &str, json: &[u8]) -> &mut Self {
        self.key(name).extend_from_slice(json);
        self
    }

    /// An integer member.
    pub fn int(&mut self, name: &str, value: i64) -> &mut Self {
        write_int(self.key(name), value);
        self
    }

    /// A boolean member.
    pub fn bool(&mut self, name: &str, value: bool) -> &mut Self {
        self.key(name)
            .extend_from_slice(if value { b"true" } else { b"false" });
        self
    }

    /// A `null` member.
    pub fn null(&mut self, name: &str) -> &mut Self {
        self.key(name).extend_from_slice(b"null");
        self
    }

    /// A timestamp member in RFC 3339.
    pub fn time(&mut self, name: &str, t: crate::ids::Micros) -> &mut Self {
        let out = self.key(name);
        out.push(b'"');
        t.write_rfc3339(out);
        out.push(b'"');
        self
    }

    /// A timestamp member, or `null`.
    pub fn opt_time(&mut self, name: &str, t: Option<crate::ids::Micros>) -> &mut Self {
        match t {
            Some(t) => self.time(name, t),
            None => self.null(name),
        }
    }

    /// An id member (hyphenated UUID).
    pub fn id(&mut self, name: &str, id: &uuid::Uuid) -> &mut Self {
        let out = self.key(name);
        write_uuid(out, id);
        self
    }

    /// Close the object.
    pub fn finish(&mut self) {
        self.out.push(b'}');
    }
}

/// Append a UUID as a quoted hyphenated string.
pub fn write_uuid(out: &mut Vec<u8>, id: &uuid::Uuid) {
    out.push(b'"');
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    out.extend_from_slice(id.hyphenated().encode_lower(&mut buf).as_bytes());
    out.push(b'"');
}

/// Append an integer in decimal, without going through `fmt`.
pub fn write_int(out: &mut Vec<u8>, v: i64) {
    let mut buf = [0u8; 20];
    let mut n = v.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if v < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&buf[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(body: &[u8]) -> String {
        match Parser::default().with_object(body, |_| ()) {
            Err(JsonError::Invalid(m)) => m,
            other => panic!("{body:?} gave {other:?}"),
        }
    }

    #[test]
    fn a_syntax_error_never_reads_as_the_servers_own() {
        for body in [
            &b"\x00"[..],
            b"{\x00}",
            b"{\"a\":\x01}",
            b"{\"a\" 1}",
            b"{]",
            b"{\"a\":tru}",
        ] {
            let m = invalid(body);
            assert!(m.starts_with("request body is not valid JSON: "), "{m}");
            assert!(
                !m.contains("internal") && !m.contains("parser"),
                "{body:?}: {m}"
            );
            assert!(m.contains("near byte"), "{m}");
        }
        assert_eq!(
            invalid(b"  "),
            "request body is empty; a JSON object was expected"
        );
    }

    #[test]
    fn numbers_beyond_a_float_are_valid_json_and_read_as_numbers() {
        let huge = format!("-1{}.0e+0", "0".repeat(400));
        let body = format!(
            r#"{{"a":1e400,"b":[{huge},1.7976931348623159e308,7],"s":"1e400 \" 1e400","c":5,"d":-1E999}}"#
        );
        let mut p = Parser::default();
        p.with_object(body.as_bytes(), |b| {
            assert_eq!(b.get("a"), Some(Field::Number));
            let items = b.array_items(b.get("b").unwrap());
            assert_eq!(items, [Field::Number, Field::Number, Field::Int(7)]);
            assert_eq!(b.get("s"), Some(Field::Str("1e400 \" 1e400")));
            assert_eq!(b.get("c"), Some(Field::Int(5)));
            assert_eq!(b.get("d"), Some(Field::Number));
        })
        .unwrap();
        // The parser's state is as good after: the next body reads as itself.
        p.with_object(br#"{"a":2}"#, |b| {
            assert_eq!(b.get("a"), Some(Field::Int(2)))
        })
        .unwrap();
        // Not numbers as the grammar has them, or wide numbers in a body wrong elsewhere: invalid.
        for body in [
            &br#"{"a":01e400}"#[..],
            br#"{"a":1e400.5}"#,
            br#"{"a":1.e400}"#,
            br#"{"a":+1e400}"#,
            br#"{"a":1e400,}"#,
            br#"{"a":1e400 1e400}"#,
            br#"{"a":[1e400}"#,
            br#"{"a":"x\ud800","b":1e400}"#,
        ] {
            let m = invalid(body);
            assert!(m.contains("near byte"), "{body:?}: {m}");
        }
    }

    #[test]
    fn a_lone_surrogate_is_found_where_it_is() {
        assert_eq!(lone_surrogate(br#"{"a":"\ud83d\ude00"}"#), None);
        assert_eq!(
            lone_surrogate(br#"{"a":"\\ud800"}"#),
            None,
            "an escaped backslash"
        );
        assert_eq!(lone_surrogate(br#"{"a":"xy\ud800"}"#), Some(8));
        assert_eq!(lone_surrogate(br#"{"a":"\udc00\ud800"}"#), Some(6));
        assert_eq!(lone_surrogate(br#"{"a":"\ud800\u0041"}"#), Some(6));
        assert_eq!(lone_surrogate(br#"{"a":"\ud800", "b":"\udc00"}"#), Some(6));
        assert_eq!(lone_surrogate(br#"{"\ud800x":1}"#), Some(2), "a name");
        assert_eq!(lone_surrogate(b"{\"a\":\"\\ud8"), None, "cut short");
        let m = invalid(br#"{"a":["\ud83d\ude00","\ud83d"]}"#);
        assert!(
            m.contains("surrogate") && m.ends_with("near byte 22"),
            "{m}"
        );
    }

    #[test]
    fn nesting_past_the_limit_says_so() {
        let deep = |n: usize| format!(r#"{{"p":{}1{}}}"#, "[".repeat(n), "]".repeat(n));
        Parser::default()
            .with_object(deep(1023).as_bytes(), |_| ())
            .unwrap();
        let m = invalid(deep(1024).as_bytes());
        assert_eq!(
            m,
            "request body nests arrays and objects more than 1024 deep (the most this server \
             reads) near byte 1028"
        );
    }

    #[test]
    fn a_numbers_magnitude_is_read_from_its_text() {
        for (number, m) in [
            ("0.5", 0),
            ("0.05", -1),
            ("120", 3),
            ("-1.5e2", 3),
            ("1e309", 310),
            ("99e307", 309),
            ("9e307", 308),
            ("1.7976931348623157e308", 309),
            ("0.000123e+5", 2),
            ("1e-400", -399),
            ("1e99999999999999999999999", i64::MAX),
            ("0.0e5", i64::MIN),
            ("-0", i64::MIN),
        ] {
            assert_eq!(magnitude(number.as_bytes()), m, "{number}");
        }
        // Long, but within a float's range: read as they are, nothing widened.
        let long = [
            format!("0.{}1", "0".repeat(500)),
            format!("{}e-790", "1".repeat(800)),
            format!("{}.5", "9".repeat(307)),
        ];
        for number in long {
            let body = format!(r#"{{"n":{number}}}"#);
            assert!(wide_numbers(body.as_bytes()).is_empty(), "{number}");
            Parser::default()
                .with_object(body.as_bytes(), |b| {
                    assert_eq!(b.get("n"), Some(Field::Number))
                })
                .unwrap();
        }
    }

    #[test]
    fn numbers_are_told_by_the_grammar() {
        for yes in [
            "0",
            "-0",
            "1",
            "-12",
            "0.5",
            "1e5",
            "1E+5",
            "-1.25e-300",
            "10",
        ] {
            assert!(is_number(yes.as_bytes()), "{yes}");
        }
        for no in [
            "", "-", "01", "1.", ".5", "1e", "1e+", "+1", "1-2", "1.2.3", "1ee5", "--1",
        ] {
            assert!(!is_number(no.as_bytes()), "{no}");
        }
    }

    fn spans(s: &str) -> Vec<&str> {
        member_value_spans(s.as_bytes())
            .unwrap()
            .into_iter()
            .map(|r| &s[r])
            .collect()
    }

    #[test]
    fn spans_are_the_values_as_received() {
        assert_eq!(
            spans(r#" { "type" : "a\"b" , "payload":{"x":[1,{"y":"}"}], "z":null} ,"n":-1.5e3 } "#),
            vec![r#""a\"b""#, r#"{"x":[1,{"y":"}"}], "z":null}"#, "-1.5e3"]
        );
        assert_eq!(spans("{}"), Vec::<&str>::new());
        assert_eq!(
            spans(r#"{"a":[],"b":true,"c":"\\"}"#),
            vec!["[]", "true", r#""\\""#]
        );
    }

    #[test]
    fn spans_refuse_what_is_not_an_object() {
        assert!(member_value_spans(b"[1]").is_none());
        assert!(member_value_spans(br#"{"a":1"#).is_none());
        assert!(member_value_spans(br#"{"a" 1}"#).is_none());
    }

    #[test]
    fn array_elements_are_found_as_received() {
        let s = r#"{"x":1, "events" : [ {"a":"]"} , "s\"" ,[1,[2]], 3 ,null ] }"#;
        let member = member_value_spans(s.as_bytes()).unwrap()[1].clone();
        let items: Vec<&str> = array_element_spans(s.as_bytes(), member)
            .unwrap()
            .into_iter()
            .map(|r| &s[r])
            .collect();
        assert_eq!(
            items,
            vec![r#"{"a":"]"}"#, r#""s\"""#, "[1,[2]]", "3", "null"]
        );
        let empty = r#"{"events":[ ]}"#;
        let member = member_value_spans(empty.as_bytes()).unwrap()[0].clone();
        assert_eq!(array_element_spans(empty.as_bytes(), member), Some(vec![]));
        // Not an array, or a span that runs past the text: none, never a panic.
        assert!(array_element_spans(b"{\"a\":1}", 5..6).is_none());
        assert!(array_element_spans(b"[1,2]", 0..99).is_none());
        assert!(array_element_spans(b"[1,2", 0..4).is_none());
    }

    #[test]
    fn object_members_are_read_in_order() {
        let mut p = Parser::default();
        let body = br#"{"a":1,"h":{"X-A":"1","n":{"deep":[1,{"z":2}]},"X-A":"2"},"b":2}"#;
        p.with_object(body, |b| {
            let members = b.object_members(b.get("h").unwrap());
            let names: Vec<&str> = members.iter().map(|(k, _)| *k).collect();
            assert_eq!(names, ["X-A", "n", "X-A"]);
            assert_eq!(members[0].1, Field::Str("1"));
            assert_eq!(members[2].1, Field::Str("2"));
            assert_eq!(b.get("b"), Some(Field::Int(2)));
            assert!(b.object_members(b.get("a").unwrap()).is_empty());
        })
        .unwrap();
    }

    #[test]
    fn body_reads_members_last_one_wins() {
        let mut p = Parser::default();
        let body = br#"{"type":"a","n":3,"type":"b\u00e9","arr":["x",1,{"k":[2]},"y"],"o":{}}"#;
        p.with_object(body, |b| {
            assert_eq!(b.get("type"), Some(Field::Str("bé")));
            assert_eq!(b.member_index("type"), Some(2));
            assert_eq!(b.get("n"), Some(Field::Int(3)));
            assert!(matches!(b.get("o"), Some(Field::Object { len: 0, .. })));
            assert_eq!(b.get("missing"), None);
            let items = b.array_items(b.get("arr").unwrap());
            assert_eq!(items.len(), 4);
            assert_eq!(items[..2], [Field::Str("x"), Field::Int(1)]);
            assert!(matches!(items[2], Field::Object { len: 1, .. }));
            assert_eq!(items[3], Field::Str("y"));
        })
        .unwrap();
    }

    #[test]
    fn body_rejects_invalid_and_non_objects() {
        let mut p = Parser::default();
        assert_eq!(p.with_object(b"[1,2]", |_| ()), Err(JsonError::NotAnObject));
        assert!(matches!(
            p.with_object(b"{\"a\":", |_| ()),
            Err(JsonError::Invalid(_))
        ));
        let Err(JsonError::Invalid(msg)) = p.with_object(b"  ", |_| ()) else {
            panic!()
        };
        assert_eq!(msg, "request body is empty; a JSON object was expected");
        // Invalid UTF-8 inside a string is invalid JSON.
        assert!(matches!(
            p.with_object(b"{\"a\":\"\xff\"}", |_| ()),
            Err(JsonError::Invalid(_))
        ));
        // Big numbers are valid JSON even if they don't fit 64 bits.
        assert!(p
            .with_object(b"{\"a\":123456789012345678901234567890}", |_| ())
            .is_ok());
    }

    #[test]
    fn writer_escapes_and_nests() {
        let mut out = Vec::new();
        let mut o = Obj::new(&mut out);
        o.str("s", "a\"\\\n\u{1}é")
            .int("i", -42)
            .null("n")
            .bool("b", true)
            .raw("r", b"[1]");
        o.finish();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            r#"{"s":"a\"\\\n\u0001é","i":-42,"n":null,"b":true,"r":[1]}"#
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["s"], "a\"\\\n\u{1}é");
    }

    #[test]
    fn ints_format() {
        for v in [0i64, 7, -1, 1234567890, i64::MIN, i64::MAX] {
            let mut out = Vec::new();
            write_int(&mut out, v);
            assert_eq!(String::from_utf8(out).unwrap(), v.to_string());
        }
    }
}
