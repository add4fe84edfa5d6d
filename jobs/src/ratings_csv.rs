//! Reading a ratings CSV line by line: good lines become ratings, bad ones become rejects that
//! name the line and the reason, and never stop the good ones.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use lensflow_core::rating::check_csv_header;
use lensflow_core::{RatingError, RatingEvent};

use crate::{JobError, Result};

/// One line of the file, judged.
#[derive(Debug)]
pub enum CsvLine {
    /// A valid rating from line `line` (1-based, header is line 1).
    Rating {
        /// The line number.
        line: u64,
        /// The rating.
        event: RatingEvent,
    },
    /// A line that is not a rating.
    Reject(Reject),
}

/// A line that could not be used, and why.
#[derive(Debug, Clone)]
pub struct Reject {
    /// 1-based line number in the input.
    pub line: u64,
    /// What is wrong with it.
    pub reason: RatingError,
    /// The line's content.
    pub content: String,
}

/// A streaming reader over a ratings CSV file. Lines are split on commas by hand: ratings
/// files hold four plain numbers per line, and counting lines ourselves keeps every reject's
/// line number exact (blank lines included).
pub struct RatingsCsv {
    path: PathBuf,
    reader: BufReader<File>,
    buf: Vec<u8>,
    line: u64,
    header_checked: bool,
    bytes_read: u64,
}

impl RatingsCsv {
    /// Opens `path`; nothing is read yet.
    pub fn open(path: &Path) -> Result<RatingsCsv> {
        let file = File::open(path).map_err(JobError::io(path))?;
        Ok(RatingsCsv {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 20, file),
            buf: Vec::with_capacity(128),
            line: 0,
            header_checked: false,
            bytes_read: 0,
        })
    }

    /// Bytes consumed so far (for a progress bar over the file size).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The next line, or `None` at the end of the file.
    pub fn next_line(&mut self) -> Result<Option<CsvLine>> {
        loop {
            self.buf.clear();
            let n = self.reader.read_until(b'\n', &mut self.buf).map_err(JobError::io(&self.path))?;
            if n == 0 {
                return Ok(None);
            }
            self.bytes_read += n as u64;
            self.line += 1;
            let text = self.buf.strip_suffix(b"\n").unwrap_or(&self.buf);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let line = self.line;
            let fields = text.split(|&b| b == b',');
            let reject = |reason| {
                let content = String::from_utf8_lossy(text).into_owned();
                Some(CsvLine::Reject(Reject { line, reason, content }))
            };
            if !self.header_checked {
                self.header_checked = true;
                if let Err(reason) = check_csv_header(fields) {
                    return Ok(reject(reason));
                }
                continue;
            }
            let fields: Vec<&[u8]> = fields.collect();
            return Ok(match RatingEvent::from_csv_fields(fields.into_iter()) {
                Ok(event) => Some(CsvLine::Rating { line, event }),
                Err(reason) => reject(reason),
            });
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
    use std::io::Write;

    use super::*;

    #[test]
    fn good_lines_pass_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.csv");
        let mut f = File::create(&path).unwrap();
        write!(f, "userId,movieId,rating,timestamp\n1,31,2.5,100\n1,x,2.5,100\n\n2,3,9.0,5\n2,3,4.0\n3,4,4.5,7\n").unwrap();
        let mut csv = RatingsCsv::open(&path).unwrap();
        let mut good = vec![];
        let mut bad = vec![];
        while let Some(line) = csv.next_line().unwrap() {
            match line {
                CsvLine::Rating { line, event } => good.push((line, event.user_id)),
                CsvLine::Reject(r) => bad.push((r.line, r.reason.to_string())),
            }
        }
        assert_eq!(good, vec![(2, 1), (7, 3)]);
        assert_eq!(bad.iter().map(|b| b.0).collect::<Vec<_>>(), vec![3, 5, 6]);
        assert!(bad[0].1.contains("movieId"), "{:?}", bad[0]);
        assert!(bad[1].1.contains("rating"), "{:?}", bad[1]);
        assert!(bad[2].1.contains("found 3"), "{:?}", bad[2]);
        assert_eq!(csv.bytes_read(), std::fs::metadata(&path).unwrap().len());
    }

    #[test]
    fn a_bad_header_is_a_reject_not_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.csv");
        std::fs::write(&path, "user,movie,stars,time\n1,31,2.5,100\n").unwrap();
        let mut csv = RatingsCsv::open(&path).unwrap();
        let first = csv.next_line().unwrap().unwrap();
        assert!(matches!(first, CsvLine::Reject(Reject { line: 1, reason: RatingError::BadHeader { .. }, .. })));
        assert!(matches!(csv.next_line().unwrap(), Some(CsvLine::Rating { line: 2, .. })));
    }
}
