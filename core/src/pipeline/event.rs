//! One event of a pipeline, from a CSV record or a Kafka payload, checked against the declared
//! columns; and a buffer of events as Arrow columns in the lake's schema.
//!
//! The Kafka payload is a JSON object keyed by the columns' wire names. Numbers may arrive as
//! strings (`{"userId":"1"}`, the seed project's producer did that), so an old producer keeps
//! working; anything else that is not the declared type is an error naming the field.

use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray};
use serde_json::Value as Json;

use super::Pipeline;
use super::definition::{Column, ColumnType};

/// One value of an event.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// An int64 column's value.
    Int(i64),
    /// A float64 column's value.
    Float(f64),
    /// A string column's value.
    Text(String),
}

impl Value {
    /// The value as a number (strings are not numbers).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(v) => Some(*v as f64),
            Value::Float(v) => Some(*v),
            Value::Text(_) => None,
        }
    }

    /// The value as JSON.
    pub fn to_json(&self) -> Json {
        match self {
            Value::Int(v) => Json::from(*v),
            Value::Float(v) => serde_json::Number::from_f64(*v).map(Json::Number).unwrap_or(Json::Null),
            Value::Text(s) => Json::from(s.as_str()),
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) => write!(f, "{v}"),
            Value::Text(s) => f.write_str(s),
        }
    }
}

/// One event: a value per column, in the definition's column order.
#[derive(Debug, Clone, PartialEq)]
pub struct Event(pub Vec<Value>);

/// Why a line or a message is not an event. Each variant names the field or the shape at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EventError {
    /// The payload is not a JSON object at all.
    #[error("not a JSON object: {0}")]
    NotJson(String),
    /// A required field is absent (or null).
    #[error("missing field `{field}`")]
    MissingField {
        /// The field's wire name.
        field: String,
    },
    /// A field holds something that is not of its type.
    #[error("field `{field}`: expected {expected}, found {found}")]
    WrongType {
        /// The field's wire name.
        field: String,
        /// What the field must hold.
        expected: &'static str,
        /// What it held, as text.
        found: String,
    },
    /// A field is of its type but breaks a rule of its column.
    #[error("field `{field}`: {value} is out of range ({allowed})")]
    OutOfRange {
        /// The field's wire name.
        field: String,
        /// The offending value, as text.
        value: String,
        /// The rule it breaks.
        allowed: String,
    },
    /// A CSV line with the wrong number of columns.
    #[error("expected {expected} columns ({header}), found {found}")]
    ColumnCount {
        /// How many the header has.
        expected: usize,
        /// The header, for the message.
        header: String,
        /// How many the line had.
        found: usize,
    },
    /// A CSV record that cannot be split into fields (an unterminated quote).
    #[error("malformed CSV record: {0}")]
    Csv(String),
    /// The first line of a CSV file is not this pipeline's header.
    #[error("bad header: expected the columns {expected}, found `{found}`")]
    BadHeader {
        /// The wire names expected.
        expected: String,
        /// The header line as found.
        found: String,
    },
    /// A field whose bytes cannot be read as a value at all: CSV text that is not UTF-8, or
    /// JSON the parser refuses inside the field (a number beyond any float, nesting deeper than
    /// the parser allows, a string that is not UTF-8).
    #[error("field `{field}`: {reason}")]
    Unreadable {
        /// The field's wire name (or the JSON key whose value was refused).
        field: String,
        /// What the parser said.
        reason: String,
    },
    /// A CSV record longer than the reader holds in memory: skipped unread, so one runaway
    /// line cannot exhaust memory.
    #[error("record longer than {limit} bytes (a line that long, or a quote that is never closed); skipped")]
    TooLong {
        /// The most bytes a record may have.
        limit: usize,
    },
    /// A CSV record that repeats the header, as when files are joined with `cat`.
    #[error("a repeated header line (were files joined together?); skipped")]
    RepeatedHeader,
}

impl EventError {
    /// The field at fault, when the error is about one field.
    pub fn field(&self) -> Option<&str> {
        match self {
            EventError::MissingField { field }
            | EventError::WrongType { field, .. }
            | EventError::OutOfRange { field, .. }
            | EventError::Unreadable { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Where each column sits in a CSV file, learned from its header.
#[derive(Debug, Clone)]
pub struct CsvLayout {
    /// For each column of the definition, its position in a record.
    positions: Vec<usize>,
    /// The header's fields as found (trimmed), extra columns included.
    names: Vec<String>,
}

impl CsvLayout {
    /// Whether a record is the header again (text compared trimmed, as the header was read).
    fn is_header(&self, fields: &[&[u8]]) -> bool {
        fields.len() == self.names.len()
            && fields.iter().zip(&self.names).all(|(f, name)| std::str::from_utf8(f).is_ok_and(|f| f.trim().trim_start_matches('\u{feff}') == name))
    }
}

impl Pipeline {
    /// The wire names, in column order: the header of this pipeline's CSV files.
    pub fn csv_header(&self) -> Vec<&str> {
        self.definition.events.columns.iter().map(Column::wire).collect()
    }

    /// Reads a CSV header: every column's wire name must be there (in any order; extra columns
    /// are ignored).
    pub fn csv_layout<'a>(&self, fields: impl Iterator<Item = &'a [u8]>) -> Result<CsvLayout, EventError> {
        let found: Vec<String> = fields.map(|f| String::from_utf8_lossy(f).trim().trim_start_matches('\u{feff}').to_string()).collect();
        let positions: Option<Vec<usize>> = self.definition.events.columns.iter().map(|c| found.iter().position(|f| f == c.wire())).collect();
        match positions {
            Some(positions) => Ok(CsvLayout { positions, names: found }),
            None => Err(EventError::BadHeader { expected: self.csv_header().join(","), found: shorten(&found.join(",")) }),
        }
    }

    /// Parses one CSV record laid out as `layout` says. A field that is not UTF-8 is refused
    /// by name rather than read with replacement characters, which would land altered text.
    pub fn event_from_csv<'a>(&self, layout: &CsvLayout, fields: impl ExactSizeIterator<Item = &'a [u8]>) -> Result<Event, EventError> {
        let width = layout.names.len();
        if fields.len() != width {
            return Err(EventError::ColumnCount { expected: width, header: layout.names.join(","), found: fields.len() });
        }
        let texts: Vec<&[u8]> = fields.collect();
        let values = self
            .definition
            .events
            .columns
            .iter()
            .zip(&layout.positions)
            .map(|(c, &i)| {
                let bytes = texts.get(i).copied().unwrap_or_default();
                let text = std::str::from_utf8(bytes).map_err(|e| EventError::Unreadable {
                    field: c.wire().to_string(),
                    reason: format!("not UTF-8 text (byte {} of the field is not valid UTF-8)", e.valid_up_to() + 1),
                })?;
                let text = text.trim();
                if text.is_empty() {
                    return Err(EventError::MissingField { field: c.wire().to_string() });
                }
                c.parse(&Json::String(text.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()
            // Only a record that fails is compared with the header: good records pay nothing.
            .map_err(|e| if layout.is_header(&texts) { EventError::RepeatedHeader } else { e })?;
        Ok(Event(values))
    }

    /// Parses a Kafka payload: a JSON object by wire names. A leading UTF-8 byte-order mark is
    /// ignored. When the JSON breaks inside one field's value, the error names that field.
    pub fn event_from_json(&self, payload: &[u8]) -> Result<Event, EventError> {
        let payload = payload.strip_prefix(UTF8_BOM).unwrap_or(payload);
        let json: Json = serde_json::from_slice(payload).map_err(|e| match refused_key(payload) {
            Some(field) => EventError::Unreadable { field, reason: e.to_string() },
            None => EventError::NotJson(e.to_string()),
        })?;
        let Json::Object(map) = json else {
            return Err(EventError::NotJson(format!("found {}", kind(&json))));
        };
        self.event_from_map(&map)
    }

    /// Reads the columns of an event from a JSON object by wire names.
    pub fn event_from_map(&self, map: &serde_json::Map<String, Json>) -> Result<Event, EventError> {
        let values = self
            .definition
            .events
            .columns
            .iter()
            .map(|c| match map.get(c.wire()) {
                None | Some(Json::Null) => Err(EventError::MissingField { field: c.wire().to_string() }),
                Some(v) => c.parse(v),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Event(values))
    }

    /// The Kafka payload of an event.
    pub fn event_to_json(&self, event: &Event) -> String {
        let map: serde_json::Map<String, Json> =
            self.definition.events.columns.iter().zip(&event.0).map(|(c, v)| (c.wire().to_string(), v.to_json())).collect();
        Json::Object(map).to_string()
    }

    /// The Kafka message key of an event.
    pub fn event_key(&self, event: &Event) -> String {
        self.definition.events.columns.iter().position(|c| c.name == self.definition.events.key).map(|i| event.0[i].to_string()).unwrap_or_default()
    }

    /// The event's time, when the pipeline has a time column.
    pub fn event_time(&self, event: &Event) -> Option<i64> {
        let time = self.definition.events.time.as_deref()?;
        let i = self.definition.events.columns.iter().position(|c| c.name == time)?;
        match event.0[i] {
            Value::Int(v) => Some(v),
            _ => None,
        }
    }
}

/// The UTF-8 byte-order mark some tools write at the start of a text.
pub const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Longest value an error quotes; a longer one is cut (an error message is read by people, and
/// an API answer or dead letter should not echo megabytes back).
const MAX_SHOWN: usize = 80;

/// `text`, cut to [`MAX_SHOWN`] characters with `…` when longer.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(MAX_SHOWN) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

/// The key whose value the JSON parser refused, when `payload` is an object that breaks inside
/// one field's value. Parses the payload again key by key; only failed payloads get here.
fn refused_key(payload: &[u8]) -> Option<String> {
    use serde::de::{Deserializer as _, MapAccess, Visitor};

    /// Remembers the key being read; cleared once its value parses.
    struct Probe<'a>(&'a mut Option<String>);

    impl<'de> Visitor<'de> for Probe<'_> {
        type Value = ();

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            loop {
                *self.0 = None;
                let Some(key) = map.next_key::<String>()? else { return Ok(()) };
                *self.0 = Some(key);
                map.next_value::<Json>()?;
            }
        }
    }

    let mut key = None;
    let _ = serde_json::Deserializer::from_slice(payload).deserialize_map(Probe(&mut key));
    key
}

/// What kind of JSON value `v` is, in words (for errors that say what was found).
pub fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// A JSON value as an error shows it: strings quoted (cut when long), numbers as written,
/// others by kind.
pub fn shown(v: &Json) -> String {
    match v {
        Json::String(s) => format!("\"{}\"", shorten(s)),
        Json::Number(n) => n.to_string(),
        other => kind(other).to_string(),
    }
}

impl Column {
    /// Checks one JSON value (or the text of a CSV field, as a JSON string) against the column.
    pub fn parse(&self, v: &Json) -> Result<Value, EventError> {
        let field = || self.wire().to_string();
        let wrong = |expected: &'static str, found: String| EventError::WrongType { field: field(), expected, found };
        let value = match self.kind {
            ColumnType::Int64 => match int_of(v) {
                Ok(n) => Value::Int(n),
                Err(IntFault::NotInteger) => return Err(wrong("an integer", shown(v))),
                Err(IntFault::TooBig) => {
                    let value = match v {
                        Json::String(s) => shorten(s.trim()),
                        other => shown(other),
                    };
                    return Err(EventError::OutOfRange { field: field(), value, allowed: INT64_RANGE.into() });
                }
            },
            ColumnType::Float64 => {
                let n = match v {
                    Json::Number(n) => n.as_f64(),
                    Json::String(s) => s.trim().parse::<f64>().ok(),
                    _ => None,
                };
                match n {
                    Some(n) if n.is_finite() => Value::Float(n),
                    // `NaN`, `inf`, `1e999`: numbers to Rust's parser, but no column may hold one.
                    Some(_) => return Err(wrong("a finite number", shown(v))),
                    None => return Err(wrong("a number", shown(v))),
                }
            }
            ColumnType::String => match v {
                Json::String(s) => Value::Text(s.clone()),
                other => return Err(wrong("a string", shown(other))),
            },
        };
        self.check(&value)?;
        Ok(value)
    }

    /// Checks a typed value against the column's rules.
    pub fn check(&self, value: &Value) -> Result<(), EventError> {
        let out = |allowed: String| EventError::OutOfRange { field: self.wire().to_string(), value: value.to_string(), allowed };
        if let Some(x) = value.as_f64() {
            if self.min.is_some_and(|m| x < m) || self.max.is_some_and(|m| x > m) {
                return Err(out(self.rule()));
            }
            if let Some(step) = self.step {
                let k = x / step;
                if (k - k.round()).abs() > 1e-9 {
                    return Err(out(self.rule()));
                }
            }
        }
        if let (Value::Text(s), Some(values)) = (value, &self.values)
            && !values.contains(s)
        {
            return Err(out(format!("one of {}", values.join(", "))));
        }
        Ok(())
    }

    /// The column's rule in words, e.g. `0.5 to 5 in steps of 0.5`.
    pub fn rule(&self) -> String {
        let mut rule = match (self.min, self.max) {
            (Some(lo), Some(hi)) => format!("{lo} to {hi}"),
            (Some(lo), None) => format!("at least {lo}"),
            (None, Some(hi)) => format!("at most {hi}"),
            (None, None) => "any value".into(),
        };
        if let Some(step) = self.step {
            rule.push_str(&format!(" in steps of {step}"));
        }
        rule
    }
}

/// What an int64 column holds, in words, for a value beyond it.
const INT64_RANGE: &str = "a 64-bit integer: -9223372036854775808 to 9223372036854775807, and within ±9e15 when written as a decimal or with an exponent";

/// Integers written as floats are taken up to this size only: beyond it a float no longer
/// holds every integer, so `1e16` may not be the integer the sender meant.
const EXACT_FLOAT_INT: f64 = 9.0e15;

/// Why a value is not an int64.
enum IntFault {
    /// Not an integer at all (`abc`, `31.5`, `NaN`).
    NotInteger,
    /// An integer beyond what the column holds.
    TooBig,
}

/// An int64 from a JSON number or string. `31.0` is an integer written loosely; `31.5` is not.
fn int_of(v: &Json) -> Result<i64, IntFault> {
    let float = match v {
        Json::Number(n) => match n.as_i64() {
            Some(i) => return Ok(i),
            // serde_json keeps 2^63..2^64 as u64; anything larger arrives as a float.
            None if n.is_u64() => return Err(IntFault::TooBig),
            None => n.as_f64(),
        },
        Json::String(s) => {
            let s = s.trim();
            if let Ok(i) = s.parse::<i64>() {
                return Ok(i);
            }
            let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(IntFault::TooBig);
            }
            s.parse::<f64>().ok()
        }
        _ => None,
    };
    match float {
        Some(f) if f.fract() == 0.0 && f.abs() < EXACT_FLOAT_INT => Ok(f as i64),
        Some(f) if f.fract() == 0.0 => Err(IntFault::TooBig),
        _ => Err(IntFault::NotInteger),
    }
}

/// The values of one column, buffered.
#[derive(Debug, Clone)]
enum Buffer {
    Int(Vec<i64>),
    Float(Vec<f64>),
    Text(Vec<String>),
}

/// Events buffered as columns, with their Kafka offsets: one Parquet file's worth.
#[derive(Debug, Clone)]
pub struct EventColumns {
    columns: Vec<Buffer>,
    offsets: Vec<i64>,
    time: Option<usize>,
    span: Option<(i64, i64)>,
}

impl EventColumns {
    /// An empty buffer for `pipeline`'s events.
    pub fn new(pipeline: &Pipeline) -> EventColumns {
        let events = &pipeline.definition.events;
        EventColumns {
            columns: events
                .columns
                .iter()
                .map(|c| match c.kind {
                    ColumnType::Int64 => Buffer::Int(Vec::new()),
                    ColumnType::Float64 => Buffer::Float(Vec::new()),
                    ColumnType::String => Buffer::Text(Vec::new()),
                })
                .collect(),
            offsets: Vec::new(),
            time: events.time.as_ref().and_then(|t| events.columns.iter().position(|c| &c.name == t)),
            span: None,
        }
    }

    /// Adds an event read at `offset`. The event must come from the same pipeline.
    pub fn push(&mut self, offset: i64, event: &Event) {
        for (buf, value) in self.columns.iter_mut().zip(&event.0) {
            match (buf, value) {
                (Buffer::Int(b), Value::Int(v)) => b.push(*v),
                (Buffer::Float(b), Value::Float(v)) => b.push(*v),
                (Buffer::Float(b), Value::Int(v)) => b.push(*v as f64),
                (Buffer::Text(b), Value::Text(v)) => b.push(v.clone()),
                // Parsing against the same columns makes other pairs impossible; a default
                // keeps the columns the same length all the same.
                (Buffer::Int(b), _) => b.push(0),
                (Buffer::Float(b), _) => b.push(0.0),
                (Buffer::Text(b), _) => b.push(String::new()),
            }
        }
        if let Some(Value::Int(t)) = self.time.map(|i| &event.0[i]) {
            self.span = Some(self.span.map_or((*t, *t), |(lo, hi)| (lo.min(*t), hi.max(*t))));
        }
        self.offsets.push(offset);
    }

    /// Events buffered.
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    /// Whether no event is buffered.
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// The earliest and latest event time, for a pipeline with a time column.
    pub fn time_span(&self) -> Option<(i64, i64)> {
        self.span
    }

    /// The events as one Arrow batch of `pipeline`'s lake schema.
    pub fn to_record_batch(&self, pipeline: &Pipeline, partition: i32) -> Result<RecordBatch, String> {
        let mut cols: Vec<ArrayRef> = self
            .columns
            .iter()
            .map(|b| -> ArrayRef {
                match b {
                    Buffer::Int(v) => Arc::new(Int64Array::from(v.clone())),
                    Buffer::Float(v) => Arc::new(Float64Array::from(v.clone())),
                    Buffer::Text(v) => Arc::new(StringArray::from(v.clone())),
                }
            })
            .collect();
        cols.push(Arc::new(Int32Array::from(vec![partition; self.len()])));
        cols.push(Arc::new(Int64Array::from(self.offsets.clone())));
        RecordBatch::try_new(pipeline.lake_schema(), cols).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn movielens() -> Pipeline {
        Pipeline::builtin("movielens").unwrap().unwrap()
    }

    #[test]
    fn parses_numbers_and_the_seeds_strings_alike() {
        let p = movielens();
        let a = p.event_from_json(br#"{"userId":1,"movieId":31,"rating":2.5,"timestamp":1260759144}"#).unwrap();
        let b = p.event_from_json(br#"{"userId":"1","movieId":"31","rating":"2.5","timestamp":"1260759144"}"#).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.0, vec![Value::Int(1), Value::Int(31), Value::Float(2.5), Value::Int(1_260_759_144)]);
        assert_eq!(p.event_from_json(p.event_to_json(&a).as_bytes()).unwrap(), a);
        assert_eq!(p.event_key(&a), "1");
        assert_eq!(p.event_time(&a), Some(1_260_759_144));
    }

    #[test]
    fn names_the_field_at_fault() {
        let p = movielens();
        let cases: [(&[u8], &str); 6] = [
            (br#"{"movieId":31,"rating":2.5,"timestamp":1}"#, "missing field `userId`"),
            (br#"{"userId":1,"movieId":"abc","rating":2.5,"timestamp":1}"#, "field `movieId`: expected an integer"),
            (br#"{"userId":1,"movieId":3,"rating":7,"timestamp":1}"#, "field `rating`: 7 is out of range"),
            (br#"{"userId":1,"movieId":3,"rating":3.3,"timestamp":1}"#, "field `rating`: 3.3 is out of range"),
            (br#"{"userId":1,"movieId":3,"rating":true,"timestamp":1}"#, "field `rating`: expected a number, found a boolean"),
            (b"not json", "not a JSON object"),
        ];
        for (payload, expected) in cases {
            let err = p.event_from_json(payload).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{err:?} should start with {expected:?}");
        }
    }

    #[test]
    fn csv_records_are_checked_like_json_and_categories_are_enforced() {
        let p = movielens();
        let layout = p.csv_layout(["userId", "movieId", "rating", "timestamp"].iter().map(|s| s.as_bytes())).unwrap();
        let ok = p.event_from_csv(&layout, ["1", "31", "2.5", "1260759144"].iter().map(|s| s.as_bytes())).unwrap();
        assert_eq!(ok.0[2], Value::Float(2.5));
        let err = p.event_from_csv(&layout, ["1", "31", "2.5"].iter().map(|s| s.as_bytes())).unwrap_err();
        assert!(matches!(err, EventError::ColumnCount { expected: 4, found: 3, .. }));
        let err = p.event_from_csv(&layout, ["1", "x", "2.5", "1"].iter().map(|s| s.as_bytes())).unwrap_err();
        assert_eq!(err.field(), Some("movieId"));
        assert!(p.csv_layout(["user", "movie"].iter().map(|s| s.as_bytes())).is_err());

        let home = Pipeline::builtin("smart-home").unwrap().unwrap();
        let header: Vec<String> = home.csv_header().iter().map(|s| s.to_string()).collect();
        let layout = home.csv_layout(header.iter().map(|s| s.as_bytes())).unwrap();
        let mut row = ["1", "Toaster", "1.5", "2.0", "1", "0", "12", "1"];
        let err = home.event_from_csv(&layout, row.iter().map(|s| s.as_bytes())).unwrap_err();
        assert_eq!(err.field(), Some("DeviceType"), "{err}");
        assert!(err.to_string().contains("one of"), "{err}");
        row[1] = "Camera";
        home.event_from_csv(&layout, row.iter().map(|s| s.as_bytes())).unwrap();
    }

    /// MovieLens with three more columns that have no rules: free text, any float, any integer.
    fn with_free_columns() -> Pipeline {
        let mut p = movielens();
        let free = |name: &str, kind| Column { name: name.into(), wire: None, kind, min: None, max: None, step: None, values: None, doc: String::new() };
        p.definition.events.columns.extend([free("note", ColumnType::String), free("weight", ColumnType::Float64), free("count", ColumnType::Int64)]);
        p
    }

    fn csv(p: &Pipeline, fields: &[&[u8]]) -> Result<Event, EventError> {
        let header: Vec<String> = p.csv_header().iter().map(|s| s.to_string()).collect();
        let layout = p.csv_layout(header.iter().map(|s| s.as_bytes())).unwrap();
        p.event_from_csv(&layout, fields.iter().copied())
    }

    #[test]
    fn hostile_csv_fields_are_refused_by_name() {
        let p = with_free_columns();
        let ok: [&[u8]; 7] = [b"1", b"31", b"2.5", b"100", b"caf\xc3\xa9", b"0.1", b"-7"];
        assert_eq!(csv(&p, &ok).unwrap().0[4], Value::Text("café".into()));
        // (column, value, field named, what the message says)
        let cases: [(usize, &[u8], &str, &str); 14] = [
            (4, b"caf\xe9", "note", "not UTF-8 text (byte 4 of the field"),
            (0, b"\xff\xfe1", "userId", "not UTF-8"),
            (2, b"NaN", "rating", "expected a finite number, found \"NaN\""),
            (2, b"inf", "rating", "expected a finite number"),
            (5, b"-inf", "weight", "expected a finite number"),
            (5, b"1e999", "weight", "expected a finite number"),
            (6, b"NaN", "count", "expected an integer"),
            (0, b"-1", "userId", "-1 is out of range (at least 1)"),
            (0, b"0", "userId", "out of range"),
            (6, b"9223372036854775808", "count", "9223372036854775808 is out of range (a 64-bit integer"),
            (6, b"-99999999999999999999999", "count", "out of range (a 64-bit integer"),
            (6, b"1e19", "count", "out of range (a 64-bit integer"),
            (6, b"12.5", "count", "expected an integer"),
            (3, b"4102444801", "timestamp", "out of range (0 to 4102444800)"),
        ];
        for (column, value, field, message) in cases {
            let mut fields = ok;
            fields[column] = value;
            let err = csv(&p, &fields).unwrap_err();
            assert_eq!(err.field(), Some(field), "{value:?}: {err}");
            assert!(err.to_string().contains(message), "{value:?}: {err:?} lacks {message:?}");
        }
        // The ends of the int64 range are values like any other, and so is an integer written as
        // a float within ±9e15.
        let mut fields = ok;
        for (text, v) in [(&b"9223372036854775807"[..], i64::MAX), (b"-9223372036854775808", i64::MIN), (b"31.0", 31), (b"8.9e15", 8_900_000_000_000_000)] {
            fields[6] = text;
            assert_eq!(csv(&p, &fields).unwrap().0[6], Value::Int(v));
        }
        // A long bad value is quoted cut short: errors are for people, not echoes.
        fields = ok;
        let long = "x".repeat(100_000);
        fields[1] = long.as_bytes();
        let err = csv(&p, &fields).unwrap_err().to_string();
        assert!(err.len() < 200 && err.contains("…"), "{} bytes: {}", err.len(), &err[..200.min(err.len())]);
    }

    #[test]
    fn a_repeated_header_is_named_as_one() {
        let p = movielens();
        let err = csv(&p, &[b"userId", b"movieId", b"rating", b"timestamp"]).unwrap_err();
        assert_eq!(err, EventError::RepeatedHeader);
        let err = csv(&p, &[b" userId ", b"movieId", b"rating", b"timestamp\r"]).unwrap_err();
        assert_eq!(err, EventError::RepeatedHeader);
        // Not the header: the field's own error.
        let err = csv(&p, &[b"userId", b"31", b"2.5", b"1"]).unwrap_err();
        assert_eq!(err.field(), Some("userId"));
    }

    #[test]
    fn hostile_kafka_payloads_are_refused_by_name() {
        let p = with_free_columns();
        let good = |edit: &str| format!(r#"{{"userId":1,"movieId":31,"rating":2.5,"timestamp":100,"note":"n","weight":0.5,"count":3{edit}}}"#);
        assert!(p.event_from_json(good("").as_bytes()).is_ok());
        // A later duplicate key wins, as in every JSON reader that keeps one value per key.
        let cases: Vec<(String, Option<&str>, &str)> = vec![
            (good(r#","rating":1e999"#), Some("rating"), "number out of range"),
            (good(r#","weight":-1e400"#), Some("weight"), "number out of range"),
            (good(r#","rating":"NaN""#), Some("rating"), "expected a finite number"),
            (good(r#","weight":"-Infinity""#), Some("weight"), "expected a finite number"),
            (good(r#","userId":-1"#), Some("userId"), "-1 is out of range (at least 1)"),
            (good(r#","count":9223372036854775808"#), Some("count"), "9223372036854775808 is out of range (a 64-bit integer"),
            (good(r#","count":18446744073709551616"#), Some("count"), "out of range (a 64-bit integer"),
            (good(r#","count":"-9223372036854775809""#), Some("count"), "out of range (a 64-bit integer"),
            (good(r#","count":1e300"#), Some("count"), "out of range (a 64-bit integer"),
            (good(r#","count":1.5"#), Some("count"), "expected an integer, found 1.5"),
            (good(r#","note":7"#), Some("note"), "expected a string, found 7"),
            (good(r#","note":{"a":1}"#), Some("note"), "expected a string, found an object"),
            (good(r#","userId":null"#), Some("userId"), "missing field `userId`"),
            (good(r#","note":"\ud800""#), Some("note"), "escape"),
            (good(&format!(r#","note":{}"#, "[".repeat(100_000))), Some("note"), "recursion limit exceeded"),
            (good(&format!(r#","deep":{}"#, "{\"a\":".repeat(100_000))), Some("deep"), "recursion limit exceeded"),
            ("[".repeat(1_000_000), None, "recursion limit exceeded"),
            (format!("{} trailing", good("")), None, "trailing characters"),
            (String::new(), None, "EOF while parsing"),
            (" \n\t".into(), None, "EOF while parsing"),
            ("null".into(), None, "found null"),
            ("[1,2]".into(), None, "found an array"),
            ("\"userId\"".into(), None, "found a string"),
            (r#"{"userId":1,"movieId":31"#.into(), None, "EOF while parsing"),
        ];
        for (payload, field, message) in &cases {
            let err = p.event_from_json(payload.as_bytes()).unwrap_err();
            let shown = &payload[..payload.len().min(60)];
            assert_eq!(err.field(), *field, "{shown}: {err}");
            assert!(err.to_string().contains(message), "{shown}: {err} lacks {message:?}");
            assert!(err.to_string().len() < 300, "{shown}: a {} byte error", err.to_string().len());
        }
        // Bytes that are not UTF-8, inside a string or as the whole payload (UTF-16 with its mark).
        let mut bytes = good("").into_bytes();
        let note = bytes.windows(3).position(|w| w == b"\"n\"").unwrap();
        bytes[note + 1] = 0xff;
        let err = p.event_from_json(&bytes).unwrap_err();
        assert_eq!(err.field(), Some("note"), "{err}");
        assert!(err.to_string().contains("invalid unicode code point"), "{err}");
        let utf16: Vec<u8> = [0xff, 0xfe].into_iter().chain(good("").encode_utf16().flat_map(u16::to_le_bytes)).collect();
        assert!(matches!(p.event_from_json(&utf16), Err(EventError::NotJson(_))));
        // A UTF-8 byte-order mark is only a mark.
        let marked = [UTF8_BOM, good("").as_bytes()].concat();
        assert_eq!(p.event_from_json(&marked).unwrap(), p.event_from_json(good("").as_bytes()).unwrap());
        // A 10 MB value in a field nobody reads is ignored; in a field that is read, it is
        // refused with the value cut short.
        let big = "x".repeat(10 << 20);
        assert!(p.event_from_json(good(&format!(r#","extra":"{big}""#)).as_bytes()).is_ok());
        let err = p.event_from_json(good(&format!(r#","movieId":"{big}""#)).as_bytes()).unwrap_err();
        assert_eq!(err.field(), Some("movieId"));
        assert!(err.to_string().len() < 200, "{} bytes", err.to_string().len());
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// JSON values of every kind, nested a little, with the numbers that break parsers.
        fn json_value() -> impl Strategy<Value = Json> {
            let leaf = prop_oneof![
                Just(Json::Null),
                any::<bool>().prop_map(Json::from),
                any::<i64>().prop_map(Json::from),
                any::<u64>().prop_map(Json::from),
                any::<f64>().prop_map(Json::from),
                prop::sample::select(vec![0.5, -0.0, 1e16, 9.0e15, 4102444800.0, 1e308, f64::MIN_POSITIVE]).prop_map(Json::from),
                ".{0,12}".prop_map(Json::from),
                prop::sample::select(vec!["NaN", "inf", "-1", "1e999", "9223372036854775808", " 31 ", "31.0", "Camera", ""]).prop_map(Json::from),
            ];
            leaf.prop_recursive(3, 16, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
                    prop::collection::btree_map(".{0,6}", inner, 0..4).prop_map(|m| Json::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Values `c` accepts, across its whole range.
        fn valid_value(c: &Column) -> BoxedStrategy<Value> {
            let strategy = match c.kind {
                ColumnType::Int64 => {
                    let lo = c.min.map_or(i64::MIN, |m| m.ceil() as i64);
                    let hi = c.max.map_or(i64::MAX, |m| m.floor() as i64);
                    (lo..=hi).prop_map(Value::Int).boxed()
                }
                ColumnType::Float64 => match (c.min, c.max, c.step) {
                    (Some(lo), Some(hi), Some(step)) => (0..=((hi - lo) / step) as u64).prop_map(move |k| Value::Float(lo + k as f64 * step)).boxed(),
                    (Some(lo), Some(hi), None) => (lo..=hi).prop_map(Value::Float).boxed(),
                    _ => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::Float).boxed(),
                },
                ColumnType::String => match &c.values {
                    Some(values) => prop::sample::select(values.clone()).prop_map(Value::Text).boxed(),
                    None => any::<String>().prop_map(|s| s.trim().to_string()).prop_filter("not empty", |s| !s.is_empty()).prop_map(Value::Text).boxed(),
                },
            };
            let c = c.clone();
            strategy.prop_filter("within the column's rules", move |v| c.check(v).is_ok()).boxed()
        }

        /// A pipeline and a valid event of it.
        fn valid_event() -> impl Strategy<Value = (Pipeline, Event)> {
            let pipelines = vec![movielens(), Pipeline::builtin("smart-home").unwrap().unwrap(), with_free_columns()];
            prop::sample::select(pipelines).prop_flat_map(|p| {
                let values: Vec<BoxedStrategy<Value>> = p.definition.events.columns.iter().map(valid_value).collect();
                (Just(p), values.prop_map(Event))
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Whatever a Kafka message holds, decoding it answers: an event that obeys every
            /// column's rules, or an error.
            #[test]
            fn any_payload_is_an_event_or_an_error(payload in prop::collection::vec(any::<u8>(), 0..256)) {
                let p = with_free_columns();
                match p.event_from_json(&payload) {
                    Ok(event) => {
                        for (c, v) in p.definition.events.columns.iter().zip(&event.0) {
                            prop_assert!(c.check(v).is_ok());
                        }
                    }
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                }
            }

            /// A JSON object is never refused without naming the field at fault: whatever its
            /// fields hold, the error names one of the pipeline's columns.
            #[test]
            fn every_error_in_an_object_names_a_column(values in prop::collection::vec(json_value(), 7), present in prop::collection::vec(any::<bool>(), 7)) {
                let p = with_free_columns();
                let map: serde_json::Map<String, Json> = p.csv_header().iter().zip(values).zip(present).filter(|(_, keep)| *keep).map(|((k, v), _)| (k.to_string(), v)).collect();
                let payload = Json::Object(map).to_string();
                if let Err(e) = p.event_from_json(payload.as_bytes()) {
                    let field = e.field().map(str::to_string);
                    prop_assert!(field.as_ref().is_some_and(|f| p.csv_header().contains(&f.as_str())), "{} names no column", e);
                }
            }

            /// A valid event survives the trip through its Kafka payload and through CSV text
            /// exactly, floats to the last bit.
            #[test]
            fn valid_events_round_trip((p, event) in valid_event()) {
                prop_assert_eq!(&p.event_from_json(p.event_to_json(&event).as_bytes()).unwrap(), &event);
                let texts: Vec<String> = event.0.iter().map(Value::to_string).collect();
                prop_assert_eq!(&csv(&p, &texts.iter().map(|t| t.as_bytes()).collect::<Vec<_>>()).unwrap(), &event);
            }

            /// Any CSV fields, of any number and any bytes: an event within the rules, or an error.
            #[test]
            fn any_csv_fields_are_an_event_or_an_error(fields in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..12), 0..10)) {
                let p = with_free_columns();
                let fields: Vec<&[u8]> = fields.iter().map(Vec::as_slice).collect();
                if let Ok(event) = csv(&p, &fields) {
                    for (c, v) in p.definition.events.columns.iter().zip(&event.0) {
                        prop_assert!(c.check(v).is_ok());
                    }
                }
            }
        }
    }

    #[test]
    fn a_buffer_becomes_a_batch_of_the_lake_schema() {
        let p = movielens();
        let mut cols = EventColumns::new(&p);
        for (i, ts) in [5, 3, 9].into_iter().enumerate() {
            cols.push(i as i64 + 10, &Event(vec![Value::Int(1), Value::Int(2), Value::Float(4.0), Value::Int(ts)]));
        }
        assert_eq!(cols.time_span(), Some((3, 9)));
        let batch = cols.to_record_batch(&p, 2).unwrap();
        assert_eq!(batch.num_rows(), 3);
        assert_eq!(batch.schema(), p.lake_schema());
    }
}
