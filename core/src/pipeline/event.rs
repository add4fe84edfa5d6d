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
}

impl EventError {
    /// The field at fault, when the error is about one field.
    pub fn field(&self) -> Option<&str> {
        match self {
            EventError::MissingField { field } | EventError::WrongType { field, .. } | EventError::OutOfRange { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Where each column sits in a CSV file, learned from its header.
#[derive(Debug, Clone)]
pub struct CsvLayout {
    /// For each column of the definition, its position in a record.
    positions: Vec<usize>,
    width: usize,
    header: String,
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
        positions
            .map(|positions| CsvLayout { positions, width: found.len(), header: found.join(",") })
            .ok_or_else(|| EventError::BadHeader { expected: self.csv_header().join(","), found: found.join(",") })
    }

    /// Parses one CSV record laid out as `layout` says.
    pub fn event_from_csv<'a>(&self, layout: &CsvLayout, fields: impl ExactSizeIterator<Item = &'a [u8]>) -> Result<Event, EventError> {
        if fields.len() != layout.width {
            return Err(EventError::ColumnCount { expected: layout.width, header: layout.header.clone(), found: fields.len() });
        }
        let texts: Vec<&[u8]> = fields.collect();
        let values = self
            .definition
            .events
            .columns
            .iter()
            .zip(&layout.positions)
            .map(|(c, &i)| {
                let text = String::from_utf8_lossy(texts[i]);
                let text = text.trim();
                if text.is_empty() {
                    return Err(EventError::MissingField { field: c.wire().to_string() });
                }
                c.parse(&Json::String(text.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Event(values))
    }

    /// Parses a Kafka payload: a JSON object by wire names.
    pub fn event_from_json(&self, payload: &[u8]) -> Result<Event, EventError> {
        let json: Json = serde_json::from_slice(payload).map_err(|e| EventError::NotJson(e.to_string()))?;
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

/// A JSON value as an error shows it: strings quoted, numbers as written, others by kind.
pub fn shown(v: &Json) -> String {
    match v {
        Json::String(s) => format!("\"{s}\""),
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
            ColumnType::Int64 => {
                let n = match v {
                    Json::Number(n) => n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15).map(|f| f as i64)),
                    // 31.0 is an integer written loosely; 31.5 is not.
                    Json::String(s) => {
                        s.trim().parse::<i64>().ok().or_else(|| s.trim().parse::<f64>().ok().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15).map(|f| f as i64))
                    }
                    _ => None,
                };
                Value::Int(n.ok_or_else(|| wrong("an integer", shown(v)))?)
            }
            ColumnType::Float64 => {
                let n = match v {
                    Json::Number(n) => n.as_f64(),
                    Json::String(s) => s.trim().parse::<f64>().ok(),
                    _ => None,
                };
                Value::Float(n.filter(|f| f.is_finite()).ok_or_else(|| wrong("a number", shown(v)))?)
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
