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

    /// The network the address is in, as analysts group by it: the /24 of
    /// an IPv4 address, the /48 of an IPv6 one (a typical site's prefix),
    /// in canonical text (`198.51.100.0/24`, `2001:db8:1::/48`).
    pub fn network(&self) -> Pii<String> {
        let addr = IpAddr::from_str(self.expose()).expect("a canonical address parses");
        Pii::new(match addr {
            IpAddr::V4(v4) => {
                let [a, b, c, _] = v4.octets();
                format!("{}/24", std::net::Ipv4Addr::new(a, b, c, 0))
            }
            IpAddr::V6(v6) => {
                let mut segments = v6.segments();
                segments[3..].fill(0);
                format!("{}/48", std::net::Ipv6Addr::from(segments))
            }
        })
    }

    /// A network in CIDR text (`198.51.100.0/24`, `2001:db8:1::/48`, the
    /// host bits may be set) as [`CanonicalIp::network`] writes it; `None`
    /// unless it is a /24 of IPv4 or a /48 of IPv6, the only networks that
    /// have tokens.
    pub fn parse_network(raw: &str) -> Option<Pii<String>> {
        let (addr, len) = raw.trim().split_once('/')?;
        let ip = CanonicalIp::parse(addr)?;
        let v4 = !ip.expose().contains(':');
        match (v4, len) {
            (true, "24") | (false, "48") => Some(ip.network()),
            _ => None,
        }
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
    fn networks_are_the_slash_24_and_slash_48_in_one_spelling() {
        let net = |s: &str| CanonicalIp::parse(s).unwrap().network().expose().clone();
        assert_eq!(net("198.51.100.23"), "198.51.100.0/24");
        assert_eq!(net("::ffff:198.51.100.200"), "198.51.100.0/24");
        assert_eq!(net("2001:db8:1:2:3::4"), "2001:db8:1::/48");
        assert_eq!(net("2001:0DB8:0001:ffff::"), "2001:db8:1::/48");
        assert_ne!(net("198.51.101.1"), net("198.51.100.1"));
        let parsed = |s: &str| CanonicalIp::parse_network(s).map(|p| p.expose().clone());
        assert_eq!(parsed("198.51.100.0/24").unwrap(), "198.51.100.0/24");
        assert_eq!(parsed("198.51.100.77/24").unwrap(), "198.51.100.0/24");
        assert_eq!(parsed("2001:db8:1::/48").unwrap(), "2001:db8:1::/48");
        for bad in [
            "198.51.100.0/16",
            "198.51.100.0",
            "2001:db8::/64",
            "x/24",
            "/24",
        ] {
            assert_eq!(parsed(bad), None, "{bad}");
        }
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
