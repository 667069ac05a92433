//! IP addresses in one canonical text form, so that formatting differences
//! (`2001:DB8::1` vs `2001:db8:0:0:0:0:0:1`, `::ffff:192.0.2.1` vs
//! `192.0.2.1`, surrounding blanks, `[…]` brackets) do not hide duplicates
//! behind different tokens.

use std::net::IpAddr;
use std::str::FromStr;

use super::pii::Pii;

/// The canonical form: IPv4 dotted quad; IPv6 as RFC 5952 (lower case,
/// longest zero run compressed); IPv4-mapped IPv6 as the IPv4 it maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalIp(Pii<String>);

impl CanonicalIp {
    /// `None` when `raw` is not an IP address. IPv4 with leading zeros
    /// (`010.0.0.1`) is refused: some tools read it as octal, so its meaning
    /// is ambiguous.
    pub fn parse(raw: &str) -> Option<Self> {
        let s = raw.trim();
        let s = s
            .strip_prefix('[')
            .and_then(|x| x.strip_suffix(']'))
            .unwrap_or(s);
        let addr = IpAddr::from_str(s).ok()?.to_canonical();
        Some(CanonicalIp(Pii::new(addr.to_string())))
    }

    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(s: &str) -> Option<String> {
        CanonicalIp::parse(s).map(|c| c.expose().to_string())
    }

    #[test]
    fn equivalent_spellings_agree() {
        assert_eq!(canon("192.0.2.1").unwrap(), "192.0.2.1");
        assert_eq!(canon(" 192.0.2.1\n").unwrap(), "192.0.2.1");
        assert_eq!(canon("::ffff:192.0.2.1").unwrap(), "192.0.2.1");
        assert_eq!(canon("2001:DB8::1").unwrap(), "2001:db8::1");
        assert_eq!(
            canon("2001:0db8:0000:0000:0000:0000:0000:0001").unwrap(),
            "2001:db8::1"
        );
        assert_eq!(canon("[2001:db8::1]").unwrap(), "2001:db8::1");
    }

    #[test]
    fn non_addresses_are_refused() {
        for bad in [
            "",
            "not-an-ip",
            "256.1.1.1",
            "1.2.3",
            "010.0.0.1",
            "1.2.3.4:80",
            "::g",
        ] {
            assert_eq!(canon(bad), None, "{bad:?} parsed");
        }
    }
}
