//! Sizes as people write them: `4194304`, `0x400000`, `4M`, `4MiB`.
#![forbid(unsafe_code)]

/// A size that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid size {found:?}: expected bytes as a decimal or 0x-hex number, optionally followed \
     by B, K/KiB, M/MiB, G/GiB or T/TiB (powers of 1024)"
)]
pub struct ParseSizeError {
    /// The text given.
    pub found: String,
}

/// Parses a byte count. Units are binary: `4M` and `4MiB` are both 4,194,304.
pub fn parse_size(text: &str) -> Result<u64, ParseSizeError> {
    let error = || ParseSizeError {
        found: text.to_owned(),
    };
    let trimmed = text.trim();
    let (number, shift) = if let Some(hex) = trimmed
        .strip_prefix("0x")
        .or_else(|| trimmed.strip_prefix("0X"))
    {
        (u64::from_str_radix(hex, 16).map_err(|_| error())?, 0)
    } else {
        let split = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (digits, unit) = trimmed.split_at(split);
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kib" => 10,
            "m" | "mib" => 20,
            "g" | "gib" => 30,
            "t" | "tib" => 40,
            _ => return Err(error()),
        };
        (digits.parse::<u64>().map_err(|_| error())?, shift)
    };
    number.checked_mul(1 << shift).ok_or_else(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Option<u64>) {
        assert_eq!(parse_size(input).ok(), expected, "{input:?}");
    }

    #[test]
    fn table() {
        check("4194304", Some(4 << 20));
        check("0x400000", Some(4 << 20));
        check("4M", Some(4 << 20));
        check("4MiB", Some(4 << 20));
        check("4mib", Some(4 << 20));
        check("1GiB", Some(1 << 30));
        check("64 KiB", Some(64 << 10));
        check("0", Some(0));
        check("12B", Some(12));
        check("", None);
        check("M", None);
        check("4MB", None);
        check("-1", None);
        check("0x", None);
        check("1.5M", None);
        check("16777216T", None); // overflows u64
        check("18446744073709551615", Some(u64::MAX));
    }
}
