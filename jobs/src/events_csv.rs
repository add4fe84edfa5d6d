//! Reading a pipeline's events from a CSV file, record by record: good records become events,
//! bad ones become rejects that name the line and the reason, and never stop the good ones.
//!
//! The header decides where each column sits (any order, extra columns ignored); a header that
//! lacks a column is an error of the whole file, because no line after it could be read right.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use lensflow_core::Pipeline;
use lensflow_core::pipeline::event::{CsvLayout, Event, EventError};

use crate::{JobError, Result};

/// A quoted record may span lines up to this size.
const MAX_QUOTED_RECORD: usize = 1 << 20;

/// One record of the file, judged.
#[derive(Debug)]
pub enum CsvLine {
    /// A valid event from line `line` (1-based; the header is line 1).
    Event {
        /// The line the record starts on.
        line: u64,
        /// The event.
        event: Event,
    },
    /// A record that is not an event.
    Reject(Reject),
}

/// A record that could not be used, and why.
#[derive(Debug, Clone)]
pub struct Reject {
    /// 1-based line number the record starts on.
    pub line: u64,
    /// What is wrong with it, naming the field when one is at fault.
    pub reason: EventError,
    /// The record's text.
    pub content: String,
}

/// A streaming reader over one pipeline's CSV file. Lines are read by hand, not by a CSV
/// library, so that every reject's line number is exact (blank lines and quoted line breaks
/// included) and a reject can quote the record as it was written.
pub struct EventsCsv<'p> {
    pipeline: &'p Pipeline,
    records: Records,
    layout: CsvLayout,
}

impl<'p> EventsCsv<'p> {
    /// Opens `path` and reads its header, which must name every column of `pipeline`.
    pub fn open(path: &Path, pipeline: &'p Pipeline) -> Result<EventsCsv<'p>> {
        let file = File::open(path).map_err(JobError::io(path))?;
        let mut records =
            Records { path: path.to_path_buf(), reader: BufReader::with_capacity(1 << 20, file), buf: Vec::with_capacity(256), line: 0, bytes_read: 0 };
        let bad = |line: u64, reason: String| JobError::Config {
            option: "input",
            reason: format!("{}: line {line}: {reason} (pipeline {})", path.display(), pipeline.name()),
        };
        let Some(line) = records.next()? else {
            return Err(bad(1, format!("no header; expected the columns {}", pipeline.csv_header().join(","))));
        };
        let fields = split_record(&records.buf).map_err(|e| bad(line, e.to_string()))?;
        let layout = pipeline.csv_layout(fields.iter().map(|f| f.as_ref())).map_err(|e| bad(line, e.to_string()))?;
        Ok(EventsCsv { pipeline, records, layout })
    }

    /// Bytes consumed so far (for a progress bar over the file size).
    pub fn bytes_read(&self) -> u64 {
        self.records.bytes_read
    }

    /// The next record, or `None` at the end of the file.
    pub fn next_line(&mut self) -> Result<Option<CsvLine>> {
        let Some(line) = self.records.next()? else { return Ok(None) };
        let text = &self.records.buf;
        let reject = |reason| CsvLine::Reject(Reject { line, reason, content: String::from_utf8_lossy(text).into_owned() });
        let fields = match split_record(text) {
            Ok(fields) => fields,
            Err(reason) => return Ok(Some(reject(reason))),
        };
        Ok(Some(match self.pipeline.event_from_csv(&self.layout, fields.iter().map(|f| f.as_ref())) {
            Ok(event) => CsvLine::Event { line, event },
            Err(reason) => reject(reason),
        }))
    }
}

/// The file as records of text, counting physical lines.
struct Records {
    path: PathBuf,
    reader: BufReader<File>,
    /// The current record, without its line end.
    buf: Vec<u8>,
    line: u64,
    bytes_read: u64,
}

impl Records {
    /// Reads the next non-blank record into `buf`; returns the line it starts on. A quoted
    /// field may hold line breaks, so a record can span lines.
    fn next(&mut self) -> Result<Option<u64>> {
        loop {
            self.buf.clear();
            if !self.read_line()? {
                return Ok(None);
            }
            let start = self.line;
            // The line break belongs to the field. An unterminated quote is left for
            // `split_record` to report, at the end of the file or once the record is too long
            // to be anything but a stray quote (which would otherwise swallow the whole file).
            while quote_open(&self.buf) && self.buf.len() < MAX_QUOTED_RECORD {
                self.buf.push(b'\n');
                if !self.read_line()? {
                    break;
                }
            }
            if !self.buf.iter().all(u8::is_ascii_whitespace) {
                return Ok(Some(start));
            }
        }
    }

    /// Appends one physical line (without `\n` or `\r\n`) to `buf`; `false` at the end of the file.
    fn read_line(&mut self) -> Result<bool> {
        let from = self.buf.len();
        let n = self.reader.read_until(b'\n', &mut self.buf).map_err(JobError::io(&self.path))?;
        if n == 0 {
            return Ok(false);
        }
        self.bytes_read += n as u64;
        self.line += 1;
        if self.buf.ends_with(b"\n") {
            self.buf.pop();
        }
        if self.buf.len() > from && self.buf.ends_with(b"\r") {
            self.buf.pop();
        }
        Ok(true)
    }
}

/// Whether a record ends inside a quoted field (so it continues on the next line). Only a
/// quote at the start of a field opens one, and `""` inside it is an escaped quote, exactly as
/// [`split_record`] reads them.
fn quote_open(text: &[u8]) -> bool {
    if !text.contains(&b'"') {
        return false;
    }
    let (mut inside, mut field_start, mut just_closed) = (false, true, false);
    for &b in text {
        if inside {
            if b == b'"' {
                inside = false;
                just_closed = true;
            }
            continue;
        }
        inside = b == b'"' && (field_start || just_closed);
        just_closed = false;
        field_start = b == b',';
    }
    inside
}

/// Splits one record into fields, RFC 4180 style: a field that starts with `"` is quoted (it
/// may hold commas, line breaks and `""` for a quote); other fields are taken as they are.
fn split_record(text: &[u8]) -> std::result::Result<Vec<Cow<'_, [u8]>>, EventError> {
    if !text.contains(&b'"') {
        // The common case (every shipped file): no copies at all.
        return Ok(text.split(|&b| b == b',').map(Cow::Borrowed).collect());
    }
    let mut fields = Vec::new();
    let mut rest = text;
    loop {
        if let Some(quoted) = rest.strip_prefix(b"\"") {
            let mut value = Vec::new();
            let mut i = 0;
            loop {
                match quoted.get(i) {
                    None => return Err(EventError::Csv("a quoted field has no closing quote".into())),
                    Some(b'"') if quoted.get(i + 1) == Some(&b'"') => {
                        value.push(b'"');
                        i += 2;
                    }
                    Some(b'"') => break,
                    Some(&b) => {
                        value.push(b);
                        i += 1;
                    }
                }
            }
            // Anything between the closing quote and the comma is kept, as spreadsheets do.
            let after = &quoted[i + 1..];
            let end = after.iter().position(|&b| b == b',').unwrap_or(after.len());
            value.extend_from_slice(&after[..end]);
            fields.push(Cow::Owned(value));
            match after.get(end) {
                Some(_) => rest = &after[end + 1..],
                None => return Ok(fields),
            }
        } else {
            let end = rest.iter().position(|&b| b == b',').unwrap_or(rest.len());
            fields.push(Cow::Borrowed(&rest[..end]));
            match rest.get(end) {
                Some(_) => rest = &rest[end + 1..],
                None => return Ok(fields),
            }
        }
    }
}

/// Writes rejects as CSV (`line,reason,content`), creating the file on the first reject only.
pub struct RejectsFile {
    path: PathBuf,
    writer: Option<csv::Writer<File>>,
    count: u64,
}

impl RejectsFile {
    /// A rejects file at `path`, not yet created.
    pub fn new(path: PathBuf) -> RejectsFile {
        RejectsFile { path, writer: None, count: 0 }
    }

    /// The default place: beside the input, `<input>.rejects.csv`.
    pub fn beside(input: &Path) -> PathBuf {
        let mut name = input.file_name().unwrap_or_default().to_os_string();
        name.push(".rejects.csv");
        input.with_file_name(name)
    }

    /// Records one reject.
    pub fn write(&mut self, reject: &Reject) -> Result<()> {
        if self.writer.is_none() {
            let mut w = csv::Writer::from_path(&self.path).map_err(|e| csv_io(&self.path, e))?;
            w.write_record(["line", "reason", "content"]).map_err(|e| csv_io(&self.path, e))?;
            self.writer = Some(w);
        }
        if let Some(w) = self.writer.as_mut() {
            let line = reject.line.to_string();
            let reason = reject.reason.to_string();
            w.write_record([line.as_str(), reason.as_str(), reject.content.as_str()]).map_err(|e| csv_io(&self.path, e))?;
        }
        self.count += 1;
        Ok(())
    }

    /// How many rejects were written.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The file's path, if any reject was written.
    pub fn finish(mut self) -> Result<Option<PathBuf>> {
        match self.writer.take() {
            Some(mut w) => {
                w.flush().map_err(JobError::io(&self.path))?;
                Ok(Some(self.path))
            }
            None => Ok(None),
        }
    }
}

fn csv_io(path: &Path, e: csv::Error) -> JobError {
    JobError::Io { path: path.to_path_buf(), source: std::io::Error::other(e.to_string()) }
}

#[cfg(test)]
mod tests {
    use lensflow_core::pipeline::event::Value;

    use super::*;

    fn builtin(name: &str) -> Pipeline {
        Pipeline::builtin(name).unwrap().unwrap()
    }

    fn read_all(path: &Path, pipeline: &Pipeline) -> (Vec<(u64, Event)>, Vec<Reject>) {
        let mut csv = EventsCsv::open(path, pipeline).unwrap();
        let (mut good, mut bad) = (vec![], vec![]);
        while let Some(line) = csv.next_line().unwrap() {
            match line {
                CsvLine::Event { line, event } => good.push((line, event)),
                CsvLine::Reject(r) => bad.push(r),
            }
        }
        assert_eq!(csv.bytes_read(), std::fs::metadata(path).unwrap().len());
        (good, bad)
    }

    #[test]
    fn good_lines_pass_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.csv");
        std::fs::write(&path, "userId,movieId,rating,timestamp\r\n1,31,2.5,100\r\n1,x,2.5,100\n\n2,3,9.0,5\n2,3,4.0\n3,4,4.5,7").unwrap();
        let (good, bad) = read_all(&path, &builtin("movielens"));
        assert_eq!(good.iter().map(|(l, e)| (*l, e.0[0].clone())).collect::<Vec<_>>(), vec![(2, Value::Int(1)), (7, Value::Int(3))]);
        assert_eq!(bad.iter().map(|b| b.line).collect::<Vec<_>>(), vec![3, 5, 6]);
        assert_eq!(bad[0].reason.field(), Some("movieId"));
        assert_eq!(bad[1].reason.field(), Some("rating"));
        assert!(bad[2].reason.to_string().contains("found 3"), "{:?}", bad[2]);
        assert_eq!(bad[2].content, "2,3,4.0");
    }

    #[test]
    fn columns_are_found_by_header_and_quotes_are_understood() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.csv");
        // Columns reordered, an extra column, a quoted comma, an escaped quote and a quoted
        // line break: the record after it still knows its own line number.
        let header = "DeviceType,UserID,UsageHoursPerDay,EnergyConsumption,UserPreferences,MalfunctionIncidents,DeviceAgeMonths,SmartHomeEfficiency,Note";
        let text =
            format!("{header}\n\"Smart Speaker\",1,1.5,2.0,1,0,12,1,\"a, b\"\n\"Lights\",2,3,4,0,1,5,0,\"say \"\"hi\"\"\nthere\"\nToaster,3,1,1,1,0,1,1,x\n");
        std::fs::write(&path, text).unwrap();
        let (good, bad) = read_all(&path, &builtin("smart-home"));
        assert_eq!(good.len(), 2);
        assert_eq!(good[0].1.0[..2], [Value::Int(1), Value::Text("Smart Speaker".into())]);
        assert_eq!(good[1].0, 3);
        assert_eq!(bad.len(), 1);
        assert_eq!((bad[0].line, bad[0].reason.field()), (5, Some("DeviceType")));
    }

    #[test]
    fn splitting_follows_rfc_4180() {
        let fields = |s: &str| split_record(s.as_bytes()).map(|f| f.iter().map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>());
        assert_eq!(fields("a,,b").unwrap(), ["a", "", "b"]);
        assert_eq!(fields("\"a,b\",\"\"\"\",c").unwrap(), ["a,b", "\"", "c"]);
        assert_eq!(fields("\"\"").unwrap(), [""]);
        assert!(fields("\"open,b").is_err());
        assert!(quote_open(b"1,\"a") && quote_open(b"1,\"a\"\"") && !quote_open(b"1,\"a\"\"b\""));
        // A quote inside an unquoted field is just a character, as split_record reads it.
        assert!(!quote_open(b"1,a\"b,2") && !quote_open(b"1,2"));
        assert_eq!(fields("1,a\"b,2").unwrap(), ["1", "a\"b", "2"]);
    }

    #[test]
    fn a_header_without_the_pipelines_columns_names_the_file_and_the_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.csv");
        std::fs::write(&path, "user,movie,stars,time\n1,31,2.5,100\n").unwrap();
        let err = EventsCsv::open(&path, &builtin("movielens")).err().unwrap().to_string();
        assert!(err.contains("r.csv: line 1: bad header"), "{err}");
        assert!(err.contains("userId,movieId,rating,timestamp"), "{err}");
        std::fs::write(&path, "\n\n").unwrap();
        let err = EventsCsv::open(&path, &builtin("movielens")).err().unwrap().to_string();
        assert!(err.contains("no header"), "{err}");
    }
}
