//! The wall clock the worker dates file lines and plans partitions by.
//!
//! `PII_VAULT_CLOCK` (an RFC 3339 time or a `YYYY-MM-DD` day, taken as that
//! day's midnight UTC) sets "now" at start; the clock then runs on from
//! there. It lets tests show what happens on a later day (a file loaded
//! again next month, a month with no partition yet) and lets a backfill
//! date an old export's lines by the day it was exported. It moves nothing
//! the database decides: audit times, reveal quotas and retention use the
//! database's own clock.

use std::sync::OnceLock;

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};

/// How far the set clock is from the real one, fixed at the first reading.
static OFFSET: OnceLock<TimeDelta> = OnceLock::new();

/// Reads `PII_VAULT_CLOCK`: `None` when unset, an error when it does not parse.
pub fn from_env() -> Result<Option<DateTime<Utc>>, String> {
    let Ok(v) = std::env::var("PII_VAULT_CLOCK") else {
        return Ok(None);
    };
    parse(&v).map(Some)
}

fn parse(v: &str) -> Result<DateTime<Utc>, String> {
    let v = v.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(v, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    Err("PII_VAULT_CLOCK is neither an RFC 3339 time nor a YYYY-MM-DD day".into())
}

/// Now, by the set clock if there is one. An unparsable `PII_VAULT_CLOCK`
/// is refused when the command starts (`run` checks [`from_env`]), so here
/// it counts as unset.
pub fn now() -> DateTime<Utc> {
    let offset = OFFSET.get_or_init(|| match from_env() {
        Ok(Some(t)) => t - Utc::now(),
        _ => TimeDelta::zero(),
    });
    Utc::now() + *offset
}

/// Today (UTC) by [`now`].
pub fn today() -> NaiveDate {
    now().date_naive()
}

/// The first day of `day`'s month: the month a row's monthly partition is
/// named by, and a data key's month.
pub fn month_of(day: NaiveDate) -> NaiveDate {
    use chrono::Datelike as _;
    day.with_day(1).expect("every month has a first day")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_times_parse_and_nonsense_does_not() {
        assert_eq!(
            parse("2027-02-03").unwrap(),
            NaiveDate::from_ymd_opt(2027, 2, 3)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap()
                .and_utc()
        );
        assert_eq!(
            parse("2027-02-03T10:00:00+02:00").unwrap().to_rfc3339(),
            "2027-02-03T08:00:00+00:00"
        );
        assert!(parse("next tuesday").is_err());
        assert!(parse("2027-13-01").is_err());
    }
}
