//! The standard `process_*` metrics, read at scrape time (Linux only).
//!
//! `prometheus-client` has no process collector, so this reads
//! `/proc/self/stat`, `/proc/self/statm`, `/proc/stat` and `/proc/self/fd`
//! each time `/metrics` is scraped, as the Go client does:
//!
//! | metric | source |
//! | --- | --- |
//! | `process_cpu_seconds_total` | user + system time (`stat` fields 14, 15) |
//! | `process_resident_memory_bytes` | resident pages (`statm` field 2) × page size |
//! | `process_virtual_memory_bytes` | `stat` field 23 |
//! | `process_open_fds` | entries of `/proc/self/fd` |
//! | `process_max_fds` | the soft `RLIMIT_NOFILE` |
//! | `process_start_time_seconds` | boot time (`/proc/stat` `btime`) + `stat` field 22 |
//! | `process_threads` | `stat` field 20 |
//!
//! On other systems, and wherever a file cannot be read, the metrics it
//! feeds are left out rather than reported as 0.

use prometheus_client::registry::Registry;

/// Adds the process collector to `registry` (which should have no prefix:
/// the names are standard).
pub fn register(registry: &mut Registry) {
    #[cfg(target_os = "linux")]
    registry.register_collector(Box::new(linux::ProcessCollector));
    #[cfg(not(target_os = "linux"))]
    let _ = registry;
}

#[cfg(target_os = "linux")]
mod linux {
    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;

    #[derive(Debug)]
    pub struct ProcessCollector;

    /// What `/proc/self/stat` says, in the units of the metrics.
    #[derive(Debug, PartialEq)]
    pub struct Stat {
        pub cpu_seconds: f64,
        pub threads: i64,
        /// Seconds after boot.
        pub start_after_boot: f64,
        pub virtual_bytes: i64,
    }

    /// Parses `/proc/self/stat`. The second field (the command name, in
    /// parentheses) may hold spaces and parentheses itself, so fields are
    /// counted from the last `)`.
    pub fn parse_stat(text: &str, ticks_per_second: f64) -> Option<Stat> {
        let rest = &text[text.rfind(')')? + 1..];
        // rest[0] is field 3 (state).
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
        Some(Stat {
            cpu_seconds: (field(14)? + field(15)?) / ticks_per_second,
            threads: field(20)? as i64,
            start_after_boot: field(22)? / ticks_per_second,
            virtual_bytes: field(23)? as i64,
        })
    }

    /// The `btime` line of `/proc/stat`: boot time, seconds since the epoch.
    pub fn parse_boot_time(text: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Resident pages: the second field of `/proc/self/statm`.
    pub fn parse_statm_resident(text: &str) -> Option<i64> {
        text.split_whitespace().nth(1)?.parse().ok()
    }

    fn gauge(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: Option<impl Into<f64>>,
    ) -> Result<(), std::fmt::Error> {
        let Some(value) = value else { return Ok(()) };
        let g = ConstGauge::new(value.into());
        let m = encoder.encode_descriptor(name, help, None, g.metric_type())?;
        g.encode(m)
    }

    impl Collector for ProcessCollector {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let ticks = rustix::param::clock_ticks_per_second() as f64;
            let stat = std::fs::read_to_string("/proc/self/stat")
                .ok()
                .and_then(|t| parse_stat(&t, ticks));
            let boot = std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|t| parse_boot_time(&t));
            let resident = std::fs::read_to_string("/proc/self/statm")
                .ok()
                .and_then(|t| parse_statm_resident(&t))
                .map(|pages| (pages * rustix::param::page_size() as i64) as f64);
            let open_fds = std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as f64);
            let max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .map(|n| n as f64);

            if let Some(s) = &stat {
                let c = ConstCounter::new(s.cpu_seconds);
                let m = encoder.encode_descriptor(
                    "process_cpu_seconds",
                    "Total user and system CPU time spent in seconds.",
                    None,
                    c.metric_type(),
                )?;
                c.encode(m)?;
            }
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                resident,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                stat.as_ref().map(|s| s.virtual_bytes as f64),
            )?;
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors.",
                open_fds,
            )?;
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors.",
                max_fds,
            )?;
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                stat.as_ref()
                    .zip(boot)
                    .map(|(s, boot)| boot + s.start_after_boot),
            )?;
            gauge(
                &mut encoder,
                "process_threads",
                "Number of OS threads in the process.",
                stat.as_ref().map(|s| s.threads as f64),
            )?;
            Ok(())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn stat_fields_are_counted_from_the_last_parenthesis() {
            // A command name with a space and a parenthesis in it.
            let line = "4242 (pii vault) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                        250 50 0 0 20 0 7 0 12345 104857600 2048 18446744073709551615";
            let s = parse_stat(line, 100.0).unwrap();
            assert_eq!(
                s,
                Stat {
                    cpu_seconds: 3.0,
                    threads: 7,
                    start_after_boot: 123.45,
                    virtual_bytes: 104_857_600,
                }
            );
            assert_eq!(parse_stat("garbage", 100.0), None);
        }

        #[test]
        fn boot_time_and_resident_pages() {
            assert_eq!(
                parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n"),
                Some(1_700_000_000.0)
            );
            assert_eq!(
                parse_statm_resident("5000 1200 300 10 0 900 0\n"),
                Some(1200)
            );
        }

        #[test]
        fn this_process_is_described() {
            let mut registry = prometheus_client::registry::Registry::default();
            super::super::register(&mut registry);
            let mut out = String::new();
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
            for name in [
                "process_cpu_seconds_total ",
                "process_resident_memory_bytes ",
                "process_virtual_memory_bytes ",
                "process_open_fds ",
                "process_max_fds ",
                "process_start_time_seconds ",
                "process_threads ",
            ] {
                assert!(out.lines().any(|l| l.starts_with(name)), "{name}in:\n{out}");
            }
        }
    }
}
