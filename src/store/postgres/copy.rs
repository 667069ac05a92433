//! Postgres binary `COPY` rows, for the write path's fast lane.
//!
//! Binary rather than text: no escaping of tabs, backslashes or newlines in
//! user-supplied text to get wrong, and bytea goes as raw bytes instead of
//! doubled hex. The format: a fixed header, per row a 16-bit field count and
//! per field a 32-bit length (-1 for NULL) and its bytes in the type's
//! binary form, then a -1 trailer (PostgreSQL docs, "COPY", Binary Format).

use chrono::NaiveDate;

/// `PGCOPY\n\377\r\n\0`, no flags, no header extension.
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// The bytes of a `date` value (without its length), for sizing a buffer.
pub(super) const DATE_BYTES: usize = 4;

/// Days from 1970-01-01 to 2000-01-01, the epoch of binary `date`.
const PG_EPOCH_DAYS: i32 = 10_957;

pub(super) struct CopyRows {
    buf: Vec<u8>,
}

impl CopyRows {
    pub fn new(capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity + HEADER.len() + 2);
        buf.extend_from_slice(HEADER);
        CopyRows { buf }
    }

    /// A buffer for rows of `fields` fields each, sized from each row's
    /// own bytes (`data`: the fields' values, without their lengths), so
    /// that it is filled without growing: each growth copies the whole
    /// batch so far.
    pub fn for_rows(fields: usize, data: impl Iterator<Item = usize>) -> Self {
        Self::new(data.map(|d| Self::row_size(fields, d)).sum())
    }

    /// The bytes a row of `fields` fields takes, `data` of them the fields'.
    fn row_size(fields: usize, data: usize) -> usize {
        2 + 4 * fields + data
    }

    pub fn row(&mut self, fields: i16) -> &mut Self {
        self.buf.extend_from_slice(&fields.to_be_bytes());
        self
    }

    /// text, varchar and bytea alike: their binary form is their bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        let len = i32::try_from(v.len()).expect("a field of a login is far below 2 GiB");
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(v);
        self
    }

    pub fn text(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    pub fn opt_text(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            Some(v) => self.text(v),
            None => self.null(),
        }
    }

    pub fn date(&mut self, v: Option<NaiveDate>) -> &mut Self {
        match v {
            Some(d) => {
                let days = (d - NaiveDate::from_ymd_opt(1970, 1, 1).expect("a valid date"))
                    .num_days() as i32
                    - PG_EPOCH_DAYS;
                self.buf
                    .extend_from_slice(&(DATE_BYTES as i32).to_be_bytes());
                self.buf.extend_from_slice(&days.to_be_bytes());
                self
            }
            None => self.null(),
        }
    }

    fn null(&mut self) -> &mut Self {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_framed_as_postgres_reads_them() {
        let mut c = CopyRows::new(0);
        c.row(3)
            .text("ab")
            .opt_text(None)
            .date(NaiveDate::from_ymd_opt(2000, 1, 2));
        let out = c.finish();
        let mut want = HEADER.to_vec();
        want.extend_from_slice(&[0, 3]);
        want.extend_from_slice(&[0, 0, 0, 2, b'a', b'b']);
        want.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        want.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 1]);
        want.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(out, want);
        assert_eq!(HEADER.len(), 19);
    }

    /// A buffer sized by `for_rows` holds its rows without growing.
    #[test]
    fn for_rows_sizes_what_the_rows_take() {
        // Each row: its field count (2), three lengths (12), the values.
        let size = (2 + 12 + 2 + DATE_BYTES) + (2 + 12 + 3 + DATE_BYTES);
        let mut c = CopyRows::for_rows(3, [2 + DATE_BYTES, 3 + DATE_BYTES].into_iter());
        let capacity = c.buf.capacity();
        for v in ["ab", "xyz"] {
            c.row(3)
                .text(v)
                .opt_text(None)
                .date(NaiveDate::from_ymd_opt(2000, 1, 2));
        }
        assert_eq!(c.buf.len(), HEADER.len() + size);
        let out = c.finish();
        assert_eq!(out.len(), HEADER.len() + size + 2);
        assert_eq!(out.capacity(), capacity);
    }
}
