//! The rating event: what one MovieLens rating is, on the wire and in CSV.
//!
//! The Kafka payload is a JSON object `{"userId":1,"movieId":31,"rating":2.5,"timestamp":1260759144}`.
//! The seed project's producer sent every value as a string (`{"userId":"1",...}`); both shapes
//! are accepted so an old producer keeps working.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

/// The CSV header every ratings file starts with.
pub const CSV_HEADER: [&str; 4] = ["userId", "movieId", "rating", "timestamp"];
/// Lowest rating MovieLens allows.
pub const MIN_RATING: f64 = 0.5;
/// Highest rating MovieLens allows.
pub const MAX_RATING: f64 = 5.0;
/// A rating at or above this counts as "liked" (the classification target).
pub const LIKED_THRESHOLD: f64 = 4.0;

/// One rating of one movie by one user at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RatingEvent {
    /// MovieLens user id (positive).
    #[serde(rename = "userId")]
    pub user_id: i64,
    /// MovieLens movie id (positive).
    #[serde(rename = "movieId")]
    pub movie_id: i64,
    /// 0.5 to 5.0 in steps of 0.5.
    pub rating: f64,
    /// Unix seconds.
    pub timestamp: i64,
}

/// Why a line or a message is not a rating. Each variant names the field or the shape at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RatingError {
    /// The payload is not a JSON object at all.
    #[error("not a JSON object: {0}")]
    NotJson(String),
    /// A required field is absent (or null).
    #[error("missing field `{field}`")]
    MissingField {
        /// The field's wire name.
        field: &'static str,
    },
    /// A field holds something that is not a number of the right kind.
    #[error("field `{field}`: expected {expected}, found {found}")]
    WrongType {
        /// The field's wire name.
        field: &'static str,
        /// What the field must hold.
        expected: &'static str,
        /// What it held, as text.
        found: String,
    },
    /// A field is a number but outside what a rating allows.
    #[error("field `{field}`: {value} is out of range ({allowed})")]
    OutOfRange {
        /// The field's wire name.
        field: &'static str,
        /// The offending value, as text.
        value: String,
        /// The rule it breaks.
        allowed: &'static str,
    },
    /// A CSV line with the wrong number of columns.
    #[error("expected 4 columns (userId,movieId,rating,timestamp), found {found}")]
    ColumnCount {
        /// How many columns the line had.
        found: usize,
    },
    /// The first line of a CSV file is not the ratings header.
    #[error("bad header: expected `userId,movieId,rating,timestamp`, found `{found}`")]
    BadHeader {
        /// The header line as found.
        found: String,
    },
}

impl RatingError {
    /// The field at fault, when the error is about one field.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            RatingError::MissingField { field }
            | RatingError::WrongType { field, .. }
            | RatingError::OutOfRange { field, .. } => Some(field),
            _ => None,
        }
    }
}

impl RatingEvent {
    /// Builds a rating from already typed values, checking the ranges.
    pub fn new(
        user_id: i64,
        movie_id: i64,
        rating: f64,
        timestamp: i64,
    ) -> Result<Self, RatingError> {
        let event = RatingEvent {
            user_id,
            movie_id,
            rating,
            timestamp,
        };
        event.validate()?;
        Ok(event)
    }

    /// Checks every field against what MovieLens allows.
    pub fn validate(&self) -> Result<(), RatingError> {
        if self.user_id <= 0 {
            return Err(out_of_range("userId", self.user_id, "a positive integer"));
        }
        if self.movie_id <= 0 {
            return Err(out_of_range("movieId", self.movie_id, "a positive integer"));
        }
        let r = self.rating;
        if !(MIN_RATING..=MAX_RATING).contains(&r) || (r * 2.0).fract() != 0.0 {
            return Err(out_of_range("rating", r, "0.5 to 5.0 in steps of 0.5"));
        }
        if self.timestamp < 0 {
            return Err(out_of_range(
                "timestamp",
                self.timestamp,
                "unix seconds, not negative",
            ));
        }
        Ok(())
    }

    /// Whether this rating counts as "liked".
    pub fn liked(&self) -> bool {
        self.rating >= LIKED_THRESHOLD
    }

    /// Parses a Kafka payload: numbers, or the seed's all-strings shape.
    pub fn from_json(payload: &[u8]) -> Result<Self, RatingError> {
        let wire: WireRating = serde_json::from_slice(payload).map_err(|e| {
            // serde's own message names the position; a field problem is reported by
            // `Loose` below with the field's name instead.
            RatingError::NotJson(e.to_string())
        })?;
        let user_id = int_field("userId", wire.user_id)?;
        let movie_id = int_field("movieId", wire.movie_id)?;
        let rating = float_field("rating", wire.rating)?;
        let timestamp = int_field("timestamp", wire.timestamp)?;
        RatingEvent::new(user_id, movie_id, rating, timestamp)
    }

    /// The Kafka payload for this rating.
    pub fn to_json(&self) -> String {
        // Four plain numbers: formatting by hand is exact and avoids a serde round per message.
        format!(
            r#"{{"userId":{},"movieId":{},"rating":{:?},"timestamp":{}}}"#,
            self.user_id, self.movie_id, self.rating, self.timestamp
        )
    }

    /// Parses the four text columns of one CSV record.
    pub fn from_csv_fields<'a>(
        fields: impl ExactSizeIterator<Item = &'a [u8]>,
    ) -> Result<Self, RatingError> {
        if fields.len() != 4 {
            return Err(RatingError::ColumnCount {
                found: fields.len(),
            });
        }
        let mut it = fields.map(|f| String::from_utf8_lossy(f).trim().to_string());
        let mut next = || it.next().unwrap_or_default();
        let user_id = int_field("userId", Some(Loose::Text(next())))?;
        let movie_id = int_field("movieId", Some(Loose::Text(next())))?;
        let rating = float_field("rating", Some(Loose::Text(next())))?;
        let timestamp = int_field("timestamp", Some(Loose::Text(next())))?;
        RatingEvent::new(user_id, movie_id, rating, timestamp)
    }

    /// The CSV line for this rating, in the column order of [`CSV_HEADER`].
    pub fn to_csv_line(&self) -> String {
        format!(
            "{},{},{:.1},{}",
            self.user_id, self.movie_id, self.rating, self.timestamp
        )
    }
}

/// Checks that a CSV header line is the ratings header.
pub fn check_csv_header<'a>(fields: impl Iterator<Item = &'a [u8]>) -> Result<(), RatingError> {
    let found: Vec<String> = fields
        .map(|f| String::from_utf8_lossy(f).trim().to_string())
        .collect();
    if found.len() == CSV_HEADER.len() && found.iter().zip(CSV_HEADER).all(|(a, b)| a == b) {
        Ok(())
    } else {
        Err(RatingError::BadHeader {
            found: found.join(","),
        })
    }
}

fn out_of_range(
    field: &'static str,
    value: impl fmt::Display,
    allowed: &'static str,
) -> RatingError {
    RatingError::OutOfRange {
        field,
        value: value.to_string(),
        allowed,
    }
}

/// The payload as it arrives, before types are checked.
#[derive(Deserialize)]
struct WireRating {
    #[serde(rename = "userId")]
    user_id: Option<Loose>,
    #[serde(rename = "movieId")]
    movie_id: Option<Loose>,
    rating: Option<Loose>,
    timestamp: Option<Loose>,
}

/// A JSON value that should be a number but may arrive as a string (the seed's format) or as
/// something else entirely, kept so the error can say what was found.
#[derive(Debug)]
enum Loose {
    Int(i64),
    Float(f64),
    Text(String),
    Other(&'static str),
}

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Loose;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number or a string holding one")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Loose, E> {
                Ok(Loose::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Loose, E> {
                Ok(i64::try_from(v)
                    .map(Loose::Int)
                    .unwrap_or(Loose::Float(v as f64)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Loose, E> {
                Ok(Loose::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Loose, E> {
                Ok(Loose::Text(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Loose, E> {
                Ok(Loose::Other("a boolean"))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<Loose, A::Error> {
                while a.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Loose::Other("an array"))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut a: A) -> Result<Loose, A::Error> {
                while a.next_entry::<de::IgnoredAny, de::IgnoredAny>()?.is_some() {}
                Ok(Loose::Other("an object"))
            }
        }
        d.deserialize_any(V)
    }
}

fn int_field(field: &'static str, value: Option<Loose>) -> Result<i64, RatingError> {
    let wrong = |found: String| RatingError::WrongType {
        field,
        expected: "an integer",
        found,
    };
    match value.ok_or(RatingError::MissingField { field })? {
        Loose::Int(v) => Ok(v),
        // 31.0 is an integer written loosely; 31.5 is not an id.
        Loose::Float(v) if v.fract() == 0.0 && v.abs() < 9.0e15 => Ok(v as i64),
        Loose::Float(v) => Err(wrong(v.to_string())),
        Loose::Text(s) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| wrong(format!("\"{s}\""))),
        Loose::Other(what) => Err(wrong(what.to_string())),
    }
}

fn float_field(field: &'static str, value: Option<Loose>) -> Result<f64, RatingError> {
    let wrong = |found: String| RatingError::WrongType {
        field,
        expected: "a number",
        found,
    };
    let v = match value.ok_or(RatingError::MissingField { field })? {
        Loose::Int(v) => v as f64,
        Loose::Float(v) => v,
        Loose::Text(s) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| wrong(format!("\"{s}\"")))?,
        Loose::Other(what) => return Err(wrong(what.to_string())),
    };
    if v.is_finite() {
        Ok(v)
    } else {
        Err(wrong(v.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_numbers_and_the_seeds_strings_alike() {
        let a = RatingEvent::from_json(
            br#"{"userId":1,"movieId":31,"rating":2.5,"timestamp":1260759144}"#,
        )
        .unwrap();
        let b = RatingEvent::from_json(
            br#"{"userId":"1","movieId":"31","rating":"2.5","timestamp":"1260759144"}"#,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a,
            RatingEvent {
                user_id: 1,
                movie_id: 31,
                rating: 2.5,
                timestamp: 1_260_759_144
            }
        );
        assert_eq!(RatingEvent::from_json(a.to_json().as_bytes()).unwrap(), a);
    }

    #[test]
    fn names_the_field_at_fault() {
        let cases: [(&[u8], &str); 6] = [
            (
                br#"{"movieId":31,"rating":2.5,"timestamp":1}"#,
                "missing field `userId`",
            ),
            (
                br#"{"userId":1,"movieId":"abc","rating":2.5,"timestamp":1}"#,
                "field `movieId`: expected an integer",
            ),
            (
                br#"{"userId":1,"movieId":3,"rating":7,"timestamp":1}"#,
                "field `rating`: 7 is out of range",
            ),
            (
                br#"{"userId":1,"movieId":3,"rating":3.3,"timestamp":1}"#,
                "field `rating`: 3.3 is out of range",
            ),
            (
                br#"{"userId":1,"movieId":3,"rating":true,"timestamp":1}"#,
                "field `rating`: expected a number, found a boolean",
            ),
            (b"not json", "not a JSON object"),
        ];
        for (payload, expected) in cases {
            let err = RatingEvent::from_json(payload).unwrap_err().to_string();
            assert!(
                err.starts_with(expected),
                "{err:?} should start with {expected:?}"
            );
        }
    }

    #[test]
    fn csv_fields_are_checked_like_json() {
        let ok = RatingEvent::from_csv_fields(
            ["1", "31", "2.5", "1260759144"]
                .iter()
                .map(|s| s.as_bytes()),
        )
        .unwrap();
        assert_eq!(ok.to_csv_line(), "1,31,2.5,1260759144");
        let err = RatingEvent::from_csv_fields(["1", "31", "2.5"].iter().map(|s| s.as_bytes()))
            .unwrap_err();
        assert_eq!(err, RatingError::ColumnCount { found: 3 });
        let err = RatingEvent::from_csv_fields(["1", "x", "2.5", "1"].iter().map(|s| s.as_bytes()))
            .unwrap_err();
        assert_eq!(err.field(), Some("movieId"));
        assert!(check_csv_header(CSV_HEADER.iter().map(|s| s.as_bytes())).is_ok());
        assert!(check_csv_header(["user", "movie"].iter().map(|s| s.as_bytes())).is_err());
    }
}
