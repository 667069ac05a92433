//! Plain-text tables and durations for terminal output.

/// A cell as it may reach a terminal: control characters (escape
/// sequences, carriage returns, newlines) escaped, so that a value written by
/// someone else (a user id, a reason) cannot move the cursor, rewrite earlier
/// lines or change the terminal's state.
pub fn safe(cell: &str) -> String {
    if !cell.chars().any(char::is_control) {
        return cell.to_string();
    }
    cell.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Left-aligned columns separated by two spaces, with a header rule. Cells
/// are passed through [`safe`].
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut t = TableWriter::new(Vec::new(), headers, usize::MAX);
    for r in rows {
        t.row(r).expect("writing to memory");
    }
    String::from_utf8(t.finish().expect("writing to memory")).expect("cells are text")
}

/// A [`table`] written while its rows still come, for output too large to
/// hold: the column widths are those of the headers and the first `window`
/// rows, which are held back until the window is full (or the table ends).
/// A later cell that is wider is written whole, and only its line runs out
/// of alignment: a cut-off cell could hide the very value someone reveals
/// a table to see.
pub struct TableWriter<W: std::io::Write> {
    out: W,
    headers: Vec<String>,
    window: usize,
    /// Rows held back (already [`safe`]) while the widths are not known.
    held: Vec<Vec<String>>,
    widths: Option<Vec<usize>>,
}

impl<W: std::io::Write> TableWriter<W> {
    pub fn new(out: W, headers: &[&str], window: usize) -> Self {
        TableWriter {
            out,
            headers: headers.iter().map(|h| safe(h)).collect(),
            window,
            held: Vec::new(),
            widths: None,
        }
    }

    pub fn row<S: AsRef<str>>(&mut self, cells: &[S]) -> std::io::Result<()> {
        let cells: Vec<String> = cells.iter().map(|c| safe(c.as_ref())).collect();
        match &self.widths {
            Some(widths) => write_line(&mut self.out, widths, &cells),
            None => {
                self.held.push(cells);
                if self.held.len() >= self.window {
                    self.release()?;
                }
                Ok(())
            }
        }
    }

    /// Writes whatever is buffered (rows held back stay held).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    /// Writes the rows still held back; the writer back.
    pub fn finish(mut self) -> std::io::Result<W> {
        if self.widths.is_none() {
            self.release()?;
        }
        self.out.flush()?;
        Ok(self.out)
    }

    /// Fixes the widths from the held rows and writes the header and them.
    fn release(&mut self) -> std::io::Result<()> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.held {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        write_line(&mut self.out, &widths, &self.headers)?;
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        write_line(&mut self.out, &widths, &rule)?;
        for r in std::mem::take(&mut self.held) {
            write_line(&mut self.out, &widths, &r)?;
        }
        self.widths = Some(widths);
        Ok(())
    }
}

fn write_line(
    out: &mut impl std::io::Write,
    widths: &[usize],
    cells: &[String],
) -> std::io::Result<()> {
    let mut s = cells
        .iter()
        .zip(widths)
        .map(|(c, w)| format!("{c:<w$}"))
        .collect::<Vec<_>>()
        .join("  ");
    s.truncate(s.trim_end().len());
    s.push('\n');
    out.write_all(s.as_bytes())
}

/// `3d 4h`, `5h 2m`, `42s`.
pub fn age(d: chrono::Duration) -> String {
    let s = d.num_seconds().max(0);
    match s {
        s if s >= 86_400 => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_are_escaped_in_tables() {
        let t = super::table(&["who"], &[vec!["eve\u{1b}[2J\r\nroot".into()]]);
        assert!(!t.contains('\u{1b}') && !t.contains('\r'));
        assert!(t.contains("eve\\u{1b}[2J\\r\\nroot"), "{t}");
        assert_eq!(super::safe("plain ünïcode"), "plain ünïcode");
    }

    #[test]
    fn a_streamed_table_takes_its_widths_from_the_first_rows_and_cuts_nothing() {
        let mut t = super::TableWriter::new(Vec::new(), &["ip", "n"], 2);
        t.row(&["10.0.0.1", "1"]).unwrap();
        assert!(t.held.len() == 1, "held back until the window is full");
        t.row(&["10.0.0.22", "2"]).unwrap();
        t.row(&["2001:db8:ffff::1234", "3"]).unwrap();
        t.row(&["10.0.0.3\u{1b}[2J", "4"]).unwrap();
        let out = String::from_utf8(t.finish().unwrap()).unwrap();
        assert_eq!(
            out,
            "ip         n\n\
             ---------  -\n\
             10.0.0.1   1\n\
             10.0.0.22  2\n\
             2001:db8:ffff::1234  3\n\
             10.0.0.3\\u{1b}[2J  4\n"
        );
        let short = super::TableWriter::new(Vec::new(), &["a", "bb"], 100);
        assert_eq!(
            String::from_utf8(short.finish().unwrap()).unwrap(),
            "a  bb\n-  --\n",
            "a table without rows still has its header"
        );
    }

    #[test]
    fn table_aligns() {
        let t = super::table(&["a", "bb"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "a    bb\n---  --\nxxx  y\n");
    }
}
