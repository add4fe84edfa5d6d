//! Reading a pipeline's events from a CSV file, record by record: good records become events,
//! bad ones become rejects that name the line and the reason, and never stop the good ones.
//!
//! The header decides where each column sits (any order, extra columns ignored); a header that
//! lacks a column is an error of the whole file, because no line after it could be read right.
//! So is a file that is not UTF-8 text at all (UTF-16, with its byte-order mark); a UTF-8
//! byte-order mark is read past. A record is held in memory up to [`MAX_RECORD`] bytes: a
//! longer one is skipped unread as a reject, and the records after it are read as usual.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use lensflow_core::Pipeline;
use lensflow_core::pipeline::event::{CsvLayout, Event, EventError, UTF8_BOM};

use crate::{JobError, Result};

/// The longest record read, in bytes (a quoted record may span lines up to this size). No
/// event of a shipped pipeline comes near it; a longer line is a damaged or foreign file, and
/// reading it whole would let one line take all memory.
pub const MAX_RECORD: usize = 1 << 20;

/// How much of a record too long to read a reject quotes.
const TOO_LONG_QUOTED: usize = 200;

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
        let mut records = Records {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 20, file),
            buf: Vec::with_capacity(256),
            line: 0,
            bytes_read: 0,
            first_line: None,
        };
        let bad = |line: u64, reason: String| JobError::Config {
            option: "input",
            reason: format!("{}: line {line}: {reason} (pipeline {})", path.display(), pipeline.name()),
        };
        let header = pipeline.csv_header().join(",");
        let line = match records.next()? {
            None => return Err(bad(1, format!("no header (the file is empty or blank); expected the columns {header}"))),
            Some(Record::TooLong(line)) => return Err(bad(line, format!("longer than {MAX_RECORD} bytes, so not a header; expected the columns {header}"))),
            Some(Record::Text(line)) => line,
        };
        // A file saved as UTF-16 (or UTF-32) by a spreadsheet: say so, rather than call its
        // header wrong.
        if records.buf.starts_with(&[0xff, 0xfe]) || records.buf.starts_with(&[0xfe, 0xff]) {
            return Err(bad(line, "the file is UTF-16 or UTF-32 text (it starts with that byte-order mark); save it as UTF-8".into()));
        }
        if records.buf.contains(&0) {
            return Err(bad(line, "the header holds NUL bytes: the file is UTF-16 without a byte-order mark, or not text; save it as UTF-8".into()));
        }
        if records.buf.starts_with(UTF8_BOM) {
            records.buf.drain(..UTF8_BOM.len());
        }
        let fields = split_record(&records.buf).map_err(|e| bad(line, e.to_string()))?;
        let layout = pipeline.csv_layout(fields.iter().map(|f| f.as_ref())).map_err(|e| {
            // A first line that is already an event: the header was left out.
            let first = pipeline.csv_layout(pipeline.csv_header().into_iter().map(str::as_bytes));
            if first.is_ok_and(|layout| pipeline.event_from_csv(&layout, fields.iter().map(|f| f.as_ref())).is_ok()) {
                bad(line, format!("no header: the first line is an event; add the header line {header} above it"))
            } else {
                bad(line, e.to_string())
            }
        })?;
        Ok(EventsCsv { pipeline, records, layout })
    }

    /// Bytes consumed so far (for a progress bar over the file size).
    pub fn bytes_read(&self) -> u64 {
        self.records.bytes_read
    }

    /// The next record, or `None` at the end of the file.
    ///
    /// A record that spans lines (a quoted field with line breaks) but does not even split
    /// into the header's columns is taken for what it almost always is, a stray quote: only its
    /// first line is the reject, and the lines after it are read again as records of their
    /// own, so a stray quote never takes good lines down with it.
    pub fn next_line(&mut self) -> Result<Option<CsvLine>> {
        let judged = match self.records.next()? {
            None => return Ok(None),
            Some(Record::Text(line)) => self.judge(line),
            Some(Record::TooLong(line)) => {
                let start = &self.records.buf[..self.records.buf.len().min(TOO_LONG_QUOTED)];
                let content = format!("{}…", String::from_utf8_lossy(start));
                CsvLine::Reject(Reject { line, reason: EventError::TooLong { limit: MAX_RECORD }, content })
            }
        };
        Ok(Some(match judged {
            CsvLine::Reject(Reject { line, reason: EventError::Csv(_) | EventError::ColumnCount { .. } | EventError::TooLong { .. }, .. })
                if self.records.back_to_first_line()? =>
            {
                self.judge(line)
            }
            judged => judged,
        }))
    }

    /// The record in the buffer, starting on `line`, as an event or a reject.
    fn judge(&self, line: u64) -> CsvLine {
        let text = &self.records.buf;
        let reject = |reason| CsvLine::Reject(Reject { line, reason, content: String::from_utf8_lossy(text).into_owned() });
        let fields = match split_record(text) {
            Ok(fields) => fields,
            Err(reason) => return reject(reason),
        };
        match self.pipeline.event_from_csv(&self.layout, fields.iter().map(|f| f.as_ref())) {
            Ok(event) => CsvLine::Event { line, event },
            Err(reason) => reject(reason),
        }
    }
}

/// The file as records of text, counting physical lines.
struct Records {
    path: PathBuf,
    reader: BufReader<File>,
    /// The current record, without its line end; never much over [`MAX_RECORD`] bytes.
    buf: Vec<u8>,
    line: u64,
    bytes_read: u64,
    /// When the current record spans lines: the line it starts on, the file position after
    /// that line, and that line's length in `buf`.
    first_line: Option<(u64, u64, usize)>,
}

/// Where the next record starts, and whether it was read.
enum Record {
    /// In `buf`, starting on this line.
    Text(u64),
    /// Longer than [`MAX_RECORD`]: starting on this line, with only its start in `buf`.
    TooLong(u64),
}

impl Records {
    /// Reads the next non-blank record into `buf`. A quoted field may hold line breaks, so a
    /// record can span lines.
    fn next(&mut self) -> Result<Option<Record>> {
        loop {
            self.buf.clear();
            self.first_line = None;
            let Some(mut cut) = self.read_line()? else { return Ok(None) };
            let start = self.line;
            let first_line = (start, self.bytes_read, self.buf.len());
            // The line break belongs to the field. An unterminated quote is left for
            // `split_record` to report, at the end of the file or once the record is too long
            // to be anything but a stray quote (which would otherwise swallow the whole file);
            // `EventsCsv::next_line` then reads the lines after its first one again.
            let mut open = quote_open(&self.buf);
            while !cut && open && self.buf.len() < MAX_RECORD {
                self.buf.push(b'\n');
                let from = self.buf.len();
                match self.read_line()? {
                    Some(c) => {
                        cut = c;
                        open = ends_in_quote(&self.buf[from..], true);
                        self.first_line = Some(first_line);
                    }
                    None => {
                        self.buf.pop();
                        break;
                    }
                }
            }
            if cut {
                return Ok(Some(Record::TooLong(start)));
            }
            if !self.buf.iter().all(u8::is_ascii_whitespace) {
                return Ok(Some(Record::Text(start)));
            }
        }
    }

    /// Makes the current record its first line only, and the file continue after that line.
    /// `false` when the record is one line already.
    fn back_to_first_line(&mut self) -> Result<bool> {
        let Some((line, position, len)) = self.first_line.take() else { return Ok(false) };
        self.reader.seek(SeekFrom::Start(position)).map_err(JobError::io(&self.path))?;
        self.bytes_read = position;
        self.line = line;
        self.buf.truncate(len);
        Ok(true)
    }

    /// Appends one physical line (without `\n` or `\r\n`) to `buf`, keeping `buf` within
    /// [`MAX_RECORD`] bytes: the rest of a longer line is read past, not kept. `None` at the end
    /// of the file, else whether the line was cut.
    fn read_line(&mut self) -> Result<Option<bool>> {
        let from = self.buf.len();
        // Room for the record's remaining bytes and the line's `\n`.
        let room = (MAX_RECORD + 1).saturating_sub(from).max(1) as u64;
        let n = (&mut self.reader).take(room).read_until(b'\n', &mut self.buf).map_err(JobError::io(&self.path))?;
        if n == 0 {
            return Ok(None);
        }
        self.bytes_read += n as u64;
        self.line += 1;
        if self.buf.ends_with(b"\n") {
            self.buf.pop();
        } else if n as u64 == room {
            // Out of room before the line's end: read past the rest of it.
            let rest = self.reader.skip_until(b'\n').map_err(JobError::io(&self.path))?;
            self.bytes_read += rest as u64;
            if rest > 0 {
                return Ok(Some(true));
            }
        }
        if self.buf.len() > from && self.buf.ends_with(b"\r") {
            self.buf.pop();
        }
        Ok(Some(false))
    }
}

/// Whether a record ends inside a quoted field (so it continues on the next line). Only a
/// quote at the start of a field opens one, and `""` inside it is an escaped quote, exactly as
/// [`split_record`] reads them.
fn quote_open(text: &[u8]) -> bool {
    ends_in_quote(text, false)
}

/// Whether `text` ends inside a quoted field, when it starts inside one (`inside`: the next
/// line of a record whose quote is open) or at the start of a record. Scanning only each new
/// line keeps a stray quote's search for its end linear, not quadratic, in the record's length.
fn ends_in_quote(text: &[u8], inside: bool) -> bool {
    if !text.contains(&b'"') {
        return inside;
    }
    let (mut inside, mut field_start, mut just_closed) = (inside, !inside, false);
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
    fn hostile_lines_are_rejects_naming_line_and_field_and_good_lines_survive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.csv");
        let mut text: Vec<u8> = Vec::new();
        text.extend_from_slice(b"\xEF\xBB\xBFuserId,movieId,rating,timestamp\n"); // 1: a UTF-8 byte-order mark is fine
        text.extend_from_slice(b"1,31,2.5,100\n"); // 2
        text.extend_from_slice(b"1,3\xff1,2.5,100\n"); // 3: not UTF-8
        text.extend_from_slice(b"1,31,2.5,"); // 4: 10 MB
        text.extend(std::iter::repeat_n(b'9', 10 << 20));
        text.extend_from_slice(b"\r\n2,31,NaN,100\n"); // 5
        text.extend_from_slice(b"2,31,inf,100\n"); // 6
        text.extend_from_slice(b"-3,31,2.5,100\n"); // 7
        text.extend_from_slice(b"99999999999999999999,31,2.5,100\n"); // 8: beyond i64
        text.extend_from_slice(b"userId,movieId,rating,timestamp\n"); // 9: the header again
        text.extend_from_slice(b"4,\"31,2.5,100\n"); // 10: a stray quote
        text.extend_from_slice(b"5,32,3.0,101\r\n"); // 11
        text.extend_from_slice(b"\n"); // 12: blank
        text.extend_from_slice(b"6,33,4.5,102"); // 13: no line end
        std::fs::write(&path, &text).unwrap();

        let pipeline = builtin("movielens");
        let mut csv = EventsCsv::open(&path, &pipeline).unwrap();
        let (mut good, mut bad) = (vec![], vec![]);
        while let Some(line) = csv.next_line().unwrap() {
            match line {
                CsvLine::Event { line, event } => good.push((line, event.0[0].clone())),
                CsvLine::Reject(r) => bad.push(r),
            }
            // The 10 MB line was never held whole.
            assert!(csv.records.buf.capacity() <= 2 * MAX_RECORD + 2, "{}", csv.records.buf.capacity());
        }
        assert_eq!(csv.bytes_read(), text.len() as u64);
        assert_eq!(good, [(2, Value::Int(1)), (11, Value::Int(5)), (13, Value::Int(6))]);
        let got: Vec<(u64, Option<&str>, String)> = bad.iter().map(|r| (r.line, r.reason.field(), r.reason.to_string())).collect();
        let expected: [(u64, Option<&str>, &str); 8] = [
            (3, Some("movieId"), "field `movieId`: not UTF-8 text"),
            (4, None, "record longer than 1048576 bytes"),
            (5, Some("rating"), "field `rating`: expected a finite number, found \"NaN\""),
            (6, Some("rating"), "field `rating`: expected a finite number, found \"inf\""),
            (7, Some("userId"), "field `userId`: -3 is out of range (at least 1)"),
            (8, Some("userId"), "field `userId`: 99999999999999999999 is out of range (a 64-bit integer"),
            (9, None, "a repeated header line"),
            (10, None, "malformed CSV record: a quoted field has no closing quote"),
        ];
        assert_eq!(got.len(), expected.len(), "{got:#?}");
        for ((line, field, reason), (want_line, want_field, want)) in got.iter().zip(expected) {
            assert_eq!((*line, *field), (want_line, want_field), "{reason}");
            assert!(reason.starts_with(want), "line {line}: {reason:?} should start with {want:?}");
        }
        assert_eq!(bad[1].content.chars().count(), TOO_LONG_QUOTED + 1, "the long line is quoted cut short");

        // Every reject lands in the rejects file, under its line, with its reason.
        let mut rejects = RejectsFile::new(dir.path().join("rejects.csv"));
        for r in &bad {
            rejects.write(r).unwrap();
        }
        let written = rejects.finish().unwrap().unwrap();
        let mut reader = csv::Reader::from_path(&written).unwrap();
        let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
        assert_eq!(rows.iter().map(|r| r[0].parse::<u64>().unwrap()).collect::<Vec<_>>(), [3, 4, 5, 6, 7, 8, 9, 10]);
        assert!(rows.iter().zip(&got).all(|(row, (_, _, reason))| &row[1] == reason));
        assert_eq!(&rows[0][2], "1,3\u{fffd}1,2.5,100");
    }

    #[test]
    fn a_stray_quote_takes_no_good_line_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.csv");
        // Line 2's quote never closes within the record limit (1.4 MB of lines follow it);
        // line 99,993's is closed by line 99,995's, making one record of the wrong width.
        // Either way only the line with the stray quote is a reject.
        let mut text = String::from("userId,movieId,rating,timestamp\n7,\"31,2.5,100\n");
        for user in 10..100_000 {
            text.push_str(&format!("{user},31,2.5,100\n"));
        }
        text.push_str("8,\"x\n9,31,2.5,100\n\"10\",31,2.5,100\n");
        std::fs::write(&path, &text).unwrap();
        let (good, bad) = read_all(&path, &builtin("movielens"));
        assert_eq!(bad.iter().map(|b| b.line).collect::<Vec<_>>(), [2, 99_993], "{bad:?}");
        assert!(bad.iter().all(|b| b.reason.to_string().contains("no closing quote")), "{bad:?}");
        assert_eq!(good.len(), 99_990 + 2);
        assert_eq!(good.last().map(|(l, e)| (*l, e.0[0].clone())), Some((99_995, Value::Int(10))));
    }

    #[test]
    fn files_that_are_not_csv_text_with_a_header_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.csv");
        let header = "userId,movieId,rating,timestamp\n1,31,2.5,100\n";
        let utf16 = |big_endian: bool, bom: bool| -> Vec<u8> {
            let units = header.encode_utf16();
            let mut out: Vec<u8> = if !bom {
                vec![]
            } else if big_endian {
                vec![0xfe, 0xff]
            } else {
                vec![0xff, 0xfe]
            };
            out.extend(units.flat_map(|u| if big_endian { u.to_be_bytes() } else { u.to_le_bytes() }));
            out
        };
        let cases: [(Vec<u8>, &str); 7] = [
            (vec![], "line 1: no header (the file is empty or blank); expected the columns userId,movieId,rating,timestamp"),
            (b" \r\n\n".to_vec(), "no header (the file is empty or blank)"),
            (utf16(false, true), "line 1: the file is UTF-16 or UTF-32 text"),
            (utf16(true, true), "line 1: the file is UTF-16 or UTF-32 text"),
            (utf16(false, false), "line 1: the header holds NUL bytes"),
            (b"1,31,2.5,100\n2,31,3.0,101\n".to_vec(), "line 1: no header: the first line is an event; add the header line userId,movieId,rating,timestamp"),
            ([b"userId,".to_vec(), vec![b'x'; 2 << 20]].concat(), "line 1: longer than 1048576 bytes, so not a header"),
        ];
        for (bytes, expected) in cases {
            std::fs::write(&path, &bytes).unwrap();
            let err = EventsCsv::open(&path, &builtin("movielens")).err().unwrap().to_string();
            assert!(err.contains(&format!("{}: ", path.display())) && err.contains(expected), "{err:?} lacks {expected:?}");
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// One line of a generated file.
        #[derive(Debug, Clone)]
        enum Line {
            /// A good rating by this user.
            Good(i64),
            /// Anything without quotes or line breaks.
            Noise(String),
            /// A field that opens a quote it never closes (and holds no comma, so a later
            /// stray quote that closes it makes a record of the wrong width).
            StrayQuote(String),
            Blank,
            Header,
        }

        fn line() -> impl Strategy<Value = Line> {
            prop_oneof![
                4 => (1..i64::MAX).prop_map(Line::Good),
                3 => "[^\"\r\n]{0,40}".prop_map(Line::Noise),
                1 => "[a-z]{0,5}".prop_map(Line::StrayQuote),
                1 => Just(Line::Blank),
                1 => Just(Line::Header),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Good lines among any amount of damage (noise, stray quotes, repeated headers,
            /// blank lines, either line end) are all read, each under its own line number; the
            /// other non-blank lines are each an event or a reject under their own line.
            #[test]
            fn every_good_line_is_read_whatever_surrounds_it(lines in prop::collection::vec((line(), any::<bool>()), 0..40)) {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("p.csv");
                let mut text = String::from("userId,movieId,rating,timestamp\n");
                for (l, crlf) in &lines {
                    match l {
                        Line::Good(user) => text.push_str(&format!("{user},31,2.5,100")),
                        Line::Noise(s) => text.push_str(s),
                        Line::StrayQuote(s) => text.push_str(&format!("1,\"{s}")),
                        Line::Blank => {}
                        Line::Header => text.push_str("userId,movieId,rating,timestamp"),
                    }
                    text.push_str(if *crlf { "\r\n" } else { "\n" });
                }
                std::fs::write(&path, &text).unwrap();
                let (good, bad) = read_all(&path, &builtin("movielens"));
                let mut seen: Vec<u64> = good.iter().map(|(l, _)| *l).chain(bad.iter().map(|b| b.line)).collect();
                seen.sort_unstable();
                let expected: Vec<u64> =
                    lines.iter().enumerate().filter(|(_, (l, _))| !matches!(l, Line::Blank) && !matches!(l, Line::Noise(s) if s.bytes().all(|b| b.is_ascii_whitespace()))).map(|(i, _)| i as u64 + 2).collect();
                prop_assert_eq!(seen, expected);
                for (i, (l, _)) in lines.iter().enumerate() {
                    if let Line::Good(user) = l {
                        prop_assert!(good.iter().any(|(at, e)| *at == i as u64 + 2 && e.0[0] == Value::Int(*user)), "line {} lost", i + 2);
                    }
                    if let Line::Header = l {
                        prop_assert!(bad.iter().any(|b| b.line == i as u64 + 2 && b.reason == EventError::RepeatedHeader));
                    }
                }
            }

            /// Any bytes at all: an error naming the file, or records, each with a line
            /// number within the file, and every byte accounted for.
            #[test]
            fn any_file_is_records_or_an_error_naming_it(bytes in prop::collection::vec(prop_oneof![any::<u8>(), Just(b'\n'), Just(b','), Just(b'"')], 0..400), header in any::<bool>()) {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("any.csv");
                let content = if header { [b"userId,movieId,rating,timestamp\n".as_slice(), &bytes].concat() } else { bytes.clone() };
                std::fs::write(&path, &content).unwrap();
                let pipeline = builtin("movielens");
                match EventsCsv::open(&path, &pipeline) {
                    Err(e) => prop_assert!(e.to_string().contains("any.csv: line "), "{}", e),
                    Ok(mut csv) => {
                        let lines = content.iter().filter(|&&b| b == b'\n').count() as u64 + 1;
                        let mut last = 1;
                        while let Some(line) = csv.next_line().unwrap() {
                            let at = match line {
                                CsvLine::Event { line, .. } => line,
                                CsvLine::Reject(r) => r.line,
                            };
                            prop_assert!(at > last && at <= lines, "line {} after {} of {}", at, last, lines);
                            last = at;
                        }
                        prop_assert_eq!(csv.bytes_read(), content.len() as u64);
                    }
                }
            }

            /// `quote_open` and `split_record` agree on where a quoted field ends: a record is
            /// continued on the next line exactly when it does not split.
            #[test]
            fn a_record_continues_exactly_when_it_does_not_split(text in prop::collection::vec(prop::sample::select(b"\",a ".to_vec()), 0..24)) {
                prop_assert_eq!(quote_open(&text), split_record(&text).is_err(), "{:?}", String::from_utf8_lossy(&text));
            }

            /// Scanning only a record's next line, from inside the quote, says what scanning
            /// the whole record again would.
            #[test]
            fn a_continued_quote_is_followed_line_by_line(lines in prop::collection::vec(prop::collection::vec(prop::sample::select(b"\",a".to_vec()), 0..8), 1..5)) {
                let mut record = lines[0].clone();
                let mut open = quote_open(&record);
                for line in &lines[1..] {
                    if !open {
                        break;
                    }
                    record.push(b'\n');
                    record.extend_from_slice(line);
                    open = ends_in_quote(line, true);
                    prop_assert_eq!(open, quote_open(&record), "{:?}", String::from_utf8_lossy(&record));
                }
            }
        }
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
