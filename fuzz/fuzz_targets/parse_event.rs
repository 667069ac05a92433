//! Any byte string is either a LoginEvent or a value-free Rejection: never a
//! panic, and never a reason that quotes the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pii_vault::domain::LoginEvent;

fuzz_target!(|data: &[u8]| {
    match LoginEvent::parse(data) {
        Ok(ev) => {
            // Canonical IPs re-parse to themselves.
            let again = pii_vault::domain::CanonicalIp::parse(ev.ip.expose()).expect("canonical IP parses");
            assert_eq!(again.expose(), ev.ip.expose());
            assert!(ev.user_id.chars().count() <= 128);
        }
        Err(why) => {
            let text = why.to_string();
            // Reasons are built from a fixed vocabulary; a long run of input
            // bytes in a reason would mean a value leaked into it.
            if data.len() >= 12 {
                for w in data.windows(12) {
                    if let Ok(s) = std::str::from_utf8(w) {
                        assert!(!text.contains(s) || s.chars().all(|c| c.is_ascii_alphabetic() || c == ' ' || c == '`' || c == '_'), "reason quotes input: {text}");
                    }
                }
            }
        }
    }
});
