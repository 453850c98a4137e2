//! The memfd seals a segment declares and a receiver requires.
#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

bitflags::bitflags! {
    /// A set of `F_SEAL_*` flags, with the kernel's bit values (fcntl(2)).
    ///
    /// Bits this version does not name are kept, not dropped: a newer kernel's
    /// seal reported by `F_GET_SEALS` still takes part in superset checks.
    ///
    /// ```
    /// use sealpass_proto::Seals;
    ///
    /// let seals: Seals = "shrink,grow|WRITE".parse()?;
    /// assert_eq!(seals, Seals::RECEIVER_DEFAULT);
    /// assert_eq!(seals.to_string(), "SHRINK|GROW|WRITE");
    /// assert!((seals | Seals::SEAL).contains(Seals::MAPPING_FLOOR));
    /// assert_eq!("none".parse::<Seals>()?, Seals::empty());
    /// assert!("shrnk".parse::<Seals>().is_err());
    /// # Ok::<(), sealpass_proto::ParseSealsError>(())
    /// ```
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct Seals: u32 {
        /// `F_SEAL_SEAL`: no further seals can be added.
        const SEAL = 0x0001;
        /// `F_SEAL_SHRINK`: the file cannot shrink.
        const SHRINK = 0x0002;
        /// `F_SEAL_GROW`: the file cannot grow.
        const GROW = 0x0004;
        /// `F_SEAL_WRITE`: the contents cannot change, through any path.
        const WRITE = 0x0008;
        /// `F_SEAL_FUTURE_WRITE`: no new writers; existing writable mappings still write.
        const FUTURE_WRITE = 0x0010;
        /// `F_SEAL_EXEC`: the file's exec bits cannot change.
        const EXEC = 0x0020;
    }
}

impl Seals {
    /// What a sender applies unless told otherwise: an immutable handoff.
    pub const SENDER_DEFAULT: Seals = Seals::SHRINK
        .union(Seals::GROW)
        .union(Seals::WRITE)
        .union(Seals::SEAL);

    /// What a receiver requires unless told otherwise. See [`crate::Policy`].
    pub const RECEIVER_DEFAULT: Seals = Seals::SHRINK.union(Seals::GROW).union(Seals::WRITE);

    /// The seals without which handing out `&[u8]` over a mapping is unsound:
    /// without SHRINK the peer can truncate and fault the reader (SIGBUS),
    /// without WRITE the bytes can change under a shared reference.
    pub const MAPPING_FLOOR: Seals = Seals::SHRINK.union(Seals::WRITE);
}

impl fmt::Display for Seals {
    /// `SHRINK|GROW|WRITE`, `none` for the empty set, unnamed bits in hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let mut first = true;
        let mut put = |f: &mut fmt::Formatter<'_>, text: &dyn fmt::Display| {
            let separator = if first { "" } else { "|" };
            first = false;
            write!(f, "{separator}{text}")
        };
        for (name, _) in self.iter_names() {
            put(f, &name)?;
        }
        let unnamed = self.bits() & !Seals::all().bits();
        if unnamed != 0 {
            put(f, &format_args!("{unnamed:#x}"))?;
        }
        Ok(())
    }
}

/// A seal list that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
#[error(
    "unknown seal {found:?}: expected a list of SEAL, SHRINK, GROW, WRITE, FUTURE_WRITE, EXEC \
     separated by ',' or '|', or 'none'"
)]
pub struct ParseSealsError {
    /// The word that is not a seal name.
    pub found: String,
}

impl FromStr for Seals {
    type Err = ParseSealsError;

    /// Parses `shrink,grow,write`, `SHRINK|GROW`, `none` or the empty string.
    /// Names are case-insensitive and may carry an `F_SEAL_` prefix.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut seals = Seals::empty();
        for word in text
            .split([',', '|'])
            .map(str::trim)
            .filter(|w| !w.is_empty())
        {
            let upper = word.to_ascii_uppercase();
            let bare = upper.strip_prefix("F_SEAL_").unwrap_or(&upper);
            if bare == "NONE" {
                continue;
            }
            seals |= Seals::from_name(bare).ok_or_else(|| ParseSealsError {
                found: word.to_owned(),
            })?;
        }
        Ok(seals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_parse(input: &str, expected: Result<Seals, &str>) {
        let parsed = input.parse::<Seals>().map_err(|e| e.found);
        assert_eq!(parsed, expected.map_err(str::to_owned), "input {input:?}");
    }

    #[test]
    fn parse_table() {
        check_parse("", Ok(Seals::empty()));
        check_parse("none", Ok(Seals::empty()));
        check_parse("shrink,grow,write,seal", Ok(Seals::SENDER_DEFAULT));
        check_parse("SHRINK|GROW|WRITE", Ok(Seals::RECEIVER_DEFAULT));
        check_parse(
            " f_seal_future_write , exec ",
            Ok(Seals::FUTURE_WRITE | Seals::EXEC),
        );
        check_parse("write,wrte", Err("wrte"));
        check_parse("0x8", Err("0x8"));
    }

    fn check_display(seals: Seals, expected: &str) {
        assert_eq!(seals.to_string(), expected);
    }

    #[test]
    fn display_table() {
        check_display(Seals::empty(), "none");
        check_display(Seals::SENDER_DEFAULT, "SEAL|SHRINK|GROW|WRITE");
        check_display(Seals::from_bits_retain(0x0108), "WRITE|0x100");
    }

    #[test]
    fn display_parses_back() {
        for bits in 0..=Seals::all().bits() {
            let seals = Seals::from_bits_retain(bits);
            assert_eq!(seals.to_string().parse::<Seals>(), Ok(seals));
        }
    }
}
