//! Human-readable sizes for command-line options: `4096`, `64K`, `1M`, `2G`,
//! `1T` (binary multiples; an optional `iB`/`B` suffix is accepted, so `64KiB`
//! and `64KB` both mean 65536).

/// A size that could not be parsed. The message quotes the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("'{0}' is not a size (expected a number with an optional K, M, G or T suffix)")]
    Invalid(String),
    #[error("'{0}' is too large (does not fit in 64 bits)")]
    Overflow(String),
}

/// Parses a size in bytes. Surrounding whitespace is not accepted, so the
/// error points at exactly what the user typed.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let invalid = || SizeError::Invalid(input.to_string());
    let digits_end = input
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(input.len());
    let (digits, suffix) = input.split_at(digits_end);
    if digits.is_empty() {
        return Err(invalid());
    }
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(invalid()),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| SizeError::Overflow(input.to_string()))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(input.to_string()))
}

/// The clap value parser for size options.
pub fn clap_size(input: &str) -> Result<u64, String> {
    parse_size(input).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_numbers_and_suffixes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("64KB"), Ok(65536));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("3G"), Ok(3 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
    }

    #[test]
    fn rejects_garbage_and_names_the_input() {
        for bad in ["", "K", "12Q", "1.5M", "-1", " 4K", "4K ", "0x10", "4KK"] {
            let e = parse_size(bad).unwrap_err();
            assert!(matches!(e, SizeError::Invalid(_)), "{bad:?} -> {e:?}");
            assert!(e.to_string().contains(&format!("'{bad}'")));
        }
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert!(matches!(
            parse_size("18446744073709551616"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("16777216T"),
            Err(SizeError::Overflow(_))
        ));
        assert_eq!(parse_size("16777215T"), Ok(16_777_215u64 << 40));
    }
}
