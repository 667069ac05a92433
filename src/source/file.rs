//! JSON Lines from a file or stdin.
//!
//! Each non-blank line is one message. Its id is a keyed hash of the
//! input's name (its source id), the line number and the content (see
//! [`crate::crypto::TokenKey::line_id`]): running the same file twice
//! stores nothing new, another file with the same lines (the next day's
//! export) is stored in full, and the id says nothing about the PII in the
//! line. `create_date` is the day the line is read ([`crate::clock`]); on
//! Postgres, a line loaded again on a later day keeps the day it was first
//! stored (the `line_ranges` table: ranges of line numbers of a source, by
//! the day their first load read them), so it lands in the same monthly
//! partition and stays a duplicate.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use super::{MessageSource, SourceError};
use crate::crypto::TokenKey;
use crate::domain::event::MAX_BODY_BYTES;
use crate::domain::{Ack, Message};

/// The UTF-8 byte order mark.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// How long to wait for more lines before handing over a partial batch.
const STREAM_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

pub struct FileSource {
    inner: Mutex<Reader>,
    ids: Arc<TokenKey>,
    source_id: String,
    /// The same, shared by every message of this input.
    source: Arc<str>,
    /// Total size in bytes, when known, for progress reporting.
    pub len: Option<u64>,
}

struct Reader {
    input: Box<dyn AsyncBufRead + Send + Unpin>,
    /// The line being read, kept here (not in a local) so that a read
    /// cancelled by a timeout loses nothing.
    partial: Zeroizing<Vec<u8>>,
    /// Whether anything of the current line was seen (an empty line still counts).
    started: bool,
    line_no: u64,
    bytes_read: u64,
    done: bool,
}

impl FileSource {
    /// The source id of `path` unless one is given: its file name. Standard
    /// input (`-`) has none, so it needs one.
    pub fn source_id(path: &Path, given: Option<&str>) -> anyhow::Result<String> {
        if let Some(id) = given {
            return Ok(id.to_string());
        }
        if path == Path::new("-") {
            anyhow::bail!(
                "reading standard input needs --source-id ID: a name for this input (say, the export's date), \
                 so that its lines are not mistaken for another input's"
            );
        }
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| anyhow::anyhow!("{} names no file", path.display()))
    }

    /// `-` reads standard input. `source_id` tells this input's lines
    /// apart from another's (see [`FileSource::source_id`]).
    pub async fn open(path: &Path, source_id: String, ids: Arc<TokenKey>) -> anyhow::Result<Self> {
        let (input, len): (Box<dyn AsyncBufRead + Send + Unpin>, _) = if path == Path::new("-") {
            (Box::new(BufReader::new(tokio::io::stdin())), None)
        } else {
            let f = tokio::fs::File::open(path)
                .await
                .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
            let len = f.metadata().await.ok().map(|m| m.len());
            (Box::new(BufReader::with_capacity(256 * 1024, f)), len)
        };
        Ok(Self::from_reader(input, len, source_id, ids))
    }

    pub fn from_reader(
        input: Box<dyn AsyncBufRead + Send + Unpin>,
        len: Option<u64>,
        source_id: String,
        ids: Arc<TokenKey>,
    ) -> Self {
        FileSource {
            inner: Mutex::new(Reader {
                input,
                partial: Zeroizing::new(Vec::new()),
                started: false,
                line_no: 0,
                bytes_read: 0,
                done: false,
            }),
            ids,
            source: Arc::from(source_id.as_str()),
            source_id,
            len,
        }
    }

    /// Whether the whole input has been read (its end was reached).
    pub async fn finished(&self) -> bool {
        self.inner.lock().await.done
    }

    /// Bytes consumed so far, for progress reporting.
    pub async fn position(&self) -> u64 {
        self.inner.lock().await.bytes_read
    }
}

impl Reader {
    /// Reads one line, keeping at most `MAX_BODY_BYTES + 1` bytes of it, so a
    /// gigabyte without a newline costs no memory and is still rejected as
    /// too large. Cancel-safe: progress is kept in `self`.
    async fn next_line(&mut self) -> std::io::Result<Option<Zeroizing<Vec<u8>>>> {
        loop {
            let buf = self.input.fill_buf().await?;
            if buf.is_empty() {
                let started = std::mem::take(&mut self.started);
                return Ok(started.then(|| std::mem::take(&mut self.partial)));
            }
            self.started = true;
            let (chunk, consumed, end) = match memchr(buf) {
                Some(i) => (&buf[..i], i + 1, true),
                None => (buf, buf.len(), false),
            };
            let room = (MAX_BODY_BYTES + 1).saturating_sub(self.partial.len());
            self.partial
                .extend_from_slice(&chunk[..chunk.len().min(room)]);
            self.input.consume(consumed);
            self.bytes_read += consumed as u64;
            if end {
                self.started = false;
                return Ok(Some(std::mem::take(&mut self.partial)));
            }
        }
    }
}

fn memchr(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

#[async_trait]
impl MessageSource for FileSource {
    async fn receive(&self, max: usize) -> Result<Option<Vec<Message>>, SourceError> {
        let mut r = self.inner.lock().await;
        if r.done {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(max);
        let now = crate::clock::now();
        while out.len() < max {
            // Wait as long as it takes for the first line; after that, hand
            // over what has arrived, so a slow stream (`tail -f | pii-vault run
            // --from-file -`) is written as it comes instead of 500 lines late.
            let line = if out.is_empty() {
                r.next_line().await
            } else {
                match tokio::time::timeout(STREAM_PAUSE, r.next_line()).await {
                    Ok(line) => line,
                    Err(_) => break,
                }
            };
            let line = line.map_err(|e| SourceError::Permanent(format!("reading input: {e}")))?;
            let Some(mut line) = line else {
                r.done = true;
                break;
            };
            r.line_no += 1;
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            // A UTF-8 byte order mark (editors on Windows write one) is
            // not part of the first line's JSON.
            if r.line_no == 1 && line.starts_with(UTF8_BOM) {
                line.drain(..UTF8_BOM.len());
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            out.push(Message {
                id: self.ids.line_id(&self.source_id, r.line_no, &line),
                body: line,
                sent_at: now,
                ack: Ack::None,
                line: Some(r.line_no),
                source: Some(self.source.clone()),
            });
        }
        if out.is_empty() && r.done {
            return Ok(None);
        }
        Ok(Some(out))
    }

    async fn ack(&self, _acks: Vec<Ack>) -> Result<(), SourceError> {
        Ok(())
    }

    fn preferred_batch(&self) -> usize {
        500
    }

    fn max_receivers(&self) -> usize {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::KeyMaterial;

    async fn read_all(input: &'static [u8]) -> Vec<Message> {
        let ids = Arc::new(TokenKey::new(
            1,
            &KeyMaterial::from_slice(&[7; 32]).unwrap(),
        ));
        let src = FileSource::from_reader(
            Box::new(BufReader::new(input)),
            None,
            "test.jsonl".into(),
            ids,
        );
        let mut all = vec![];
        while let Some(batch) = src.receive(2).await.unwrap() {
            all.extend(batch);
        }
        all
    }

    #[tokio::test]
    async fn lines_blank_lines_and_crlf() {
        let msgs = read_all(b"{\"a\":1}\r\n\n  \n{\"b\":2}\n{\"c\":3}").await;
        let bodies: Vec<&[u8]> = msgs.iter().map(|m| &m.body[..]).collect();
        assert_eq!(bodies, vec![&b"{\"a\":1}"[..], b"{\"b\":2}", b"{\"c\":3}"]);
    }

    #[tokio::test]
    async fn a_byte_order_mark_is_dropped_from_the_first_line_only() {
        let msgs = read_all(b"\xEF\xBB\xBF{\"a\":1}\n\xEF\xBB\xBF{\"b\":2}\n").await;
        assert_eq!(&msgs[0].body[..], b"{\"a\":1}");
        assert_eq!(&msgs[1].body[..], b"\xEF\xBB\xBF{\"b\":2}");
    }

    #[tokio::test]
    async fn ids_are_stable_and_distinct_for_equal_lines() {
        let a = read_all(b"same\nsame\n").await;
        let b = read_all(b"same\nsame\n").await;
        assert_ne!(a[0].id, a[1].id);
        assert_eq!(a[0].id, b[0].id);
        assert_eq!(a[1].id, b[1].id);
    }

    #[test]
    fn a_file_is_named_by_its_file_name_and_stdin_needs_a_name() {
        let id = |p: &str, g: Option<&str>| FileSource::source_id(Path::new(p), g);
        assert_eq!(id("/data/exports/day1.jsonl", None).unwrap(), "day1.jsonl");
        assert_eq!(id("day1.jsonl", Some("2026-11-25")).unwrap(), "2026-11-25");
        assert!(id("-", None)
            .unwrap_err()
            .to_string()
            .contains("--source-id"));
        assert_eq!(id("-", Some("feed")).unwrap(), "feed");
    }

    #[tokio::test]
    async fn an_endless_line_is_truncated_not_buffered() {
        let huge: &'static [u8] = Box::leak(vec![b'x'; 5 * MAX_BODY_BYTES].into_boxed_slice());
        let msgs = read_all(huge).await;
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].body.len(), MAX_BODY_BYTES + 1);
    }
}
