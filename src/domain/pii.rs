//! A wrapper for personal data that must never reach a log, an error or a
//! panic message.

use zeroize::Zeroize;

/// Holds a PII value: `Debug` prints `[redacted]`, there is no `Display`, and
/// the value is zeroized when dropped. Reading it takes an explicit
/// [`Pii::expose`], which is easy to find in review.
#[derive(Clone, PartialEq, Eq)]
pub struct Pii<T: Zeroize>(T);

impl<T: Zeroize> Pii<T> {
    pub fn new(value: T) -> Self {
        Pii(value)
    }

    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T: Zeroize> Drop for Pii<T> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<T: Zeroize> std::fmt::Debug for Pii<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let p = Pii::new("199.172.111.135".to_string());
        assert_eq!(format!("{p:?}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&p)), "Some([redacted])");
    }
}
