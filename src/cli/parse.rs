//! The command line's own value parsers: dates, times, durations, reasons.
//! Each says what it expects, never echoing a value it refused.

pub(super) fn parse_day(s: &str) -> Result<chrono::NaiveDate, String> {
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|_| "expected a day as YYYY-MM-DD, e.g. 2025-12-01".to_string())
}

pub(super) fn parse_since(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map(|d| d.and_hms_opt(0, 0, 0).expect("midnight").and_utc())
        .map_err(|_| {
            "expected an RFC 3339 time (2026-11-25T09:00:00Z) or a date (2026-11-25)".into()
        })
}

/// `0`, or a whole number with a unit: `s`, `m`, `h`, `d`.
pub(super) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| "expected a number and a unit: 30s, 15m, 12h, 7d".to_string())?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err("the unit is one of s, m, h, d (30s, 15m, 12h, 7d)".into()),
    };
    if secs > 366 * 86_400 {
        return Err("at most a year".into());
    }
    Ok(std::time::Duration::from_secs(secs))
}

pub(super) fn non_blank(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("must not be blank".into())
    } else if s.len() > 1000 {
        Err("must be at most 1000 bytes".into())
    } else {
        Ok(s.to_string())
    }
}

/// Takes out of a refused command line's error whatever the user typed as
/// a value or a stray argument: clap quotes it ("invalid value
/// '198.51.100.23' for '--concurrency'"), and what was typed may be an
/// original IP or device id put in the wrong place. The flag, the reason
/// and the usage stay.
pub fn redact_usage_error(e: &mut clap::Error) {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    const NOT_SHOWN: &str = "…";
    if e.get(ContextKind::InvalidValue).is_some() {
        e.insert(
            ContextKind::InvalidValue,
            ContextValue::String(NOT_SHOWN.into()),
        );
    }
    // These kinds' InvalidArg / InvalidSubcommand is the typed text itself,
    // not a flag's name.
    if matches!(e.kind(), ErrorKind::UnknownArgument) && e.get(ContextKind::InvalidArg).is_some() {
        e.insert(
            ContextKind::InvalidArg,
            ContextValue::String(NOT_SHOWN.into()),
        );
    }
    if e.get(ContextKind::InvalidSubcommand).is_some() {
        e.insert(
            ContextKind::InvalidSubcommand,
            ContextValue::String(NOT_SHOWN.into()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::redact_usage_error;
    use crate::cli::Cli;
    use clap::Parser as _;

    fn refused(args: &[&str]) -> String {
        let mut e = Cli::try_parse_from(args).unwrap_err();
        redact_usage_error(&mut e);
        e.render().to_string()
    }

    #[test]
    fn refused_command_lines_do_not_repeat_what_was_typed() {
        let ip = "198.51.100.23";
        for args in [
            vec!["pii-vault", "reveal", ip, "--reason", "x"],
            vec!["pii-vault", "run", "--concurrency", ip],
            vec!["pii-vault", ip],
            vec![
                "pii-vault",
                "reveal",
                "--user-id",
                "u",
                "--reason",
                "x",
                "--format",
                ip,
            ],
            vec!["pii-vault", "keys", ip],
        ] {
            let text = refused(&args);
            assert!(!text.contains(ip), "{args:?}: {text}");
            assert!(
                text.contains("Usage") || text.contains("--help"),
                "{args:?}: {text}"
            );
        }
        assert!(refused(&["pii-vault", "run", "--concurrency", "x"]).contains("--concurrency"));
    }
}
