//! Byte counts in flags as Kubernetes writes them (`8Mi`, `32Mi`, `1G`,
//! `65536`): a whole number with an optional suffix, binary (`Ki`, `Mi`,
//! `Gi`, `Ti`) or decimal (`k`, `M`, `G`, `T`). No fractions or exponents:
//! a flag that takes bytes wants a count, and `1.5Gi` is `1536Mi`.

/// Parse a byte count, for clap's `value_parser`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{text:?} is not a byte count: write a whole number with an optional suffix, e.g. 8Mi, 512Ki, 1G or 65536"
        )
    };
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, suffix) = text.split_at(digits);
    if number.is_empty() {
        return Err(bad());
    }
    let unit: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("{text:?} is too large a byte count"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_with_and_without_suffixes() {
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("8Mi"), Ok(8 << 20));
        assert_eq!(parse_bytes("512Ki"), Ok(512 << 10));
        assert_eq!(parse_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("3M"), Ok(3_000_000));
    }

    #[test]
    fn what_is_not_a_count_is_named() {
        for bad in ["", "Mi", "8 Mi", "8mi", "1.5Gi", "-1", "8MiB", "1e6", " 8"] {
            let e = parse_bytes(bad).expect_err(bad);
            assert!(
                e.contains(&format!("{bad:?}")) && e.contains("e.g. 8Mi"),
                "{e}"
            );
        }
        let e = parse_bytes("99999999999Ti").expect_err("overflow");
        assert!(e.contains("too large"), "{e}");
    }
}
