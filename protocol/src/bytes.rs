//! Fixed-width integers read out of untrusted bytes (superblocks, image headers, ELF files):
//! `None` when the field does not lie wholly inside, whatever the offset (pure); and bytes as
//! lowercase hex.

/// `bytes` as lowercase hex, two digits a byte (one allocation: the helper renders thousands of
/// digests and paths a boot on an emulated CPU).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

fn field<const N: usize>(b: &[u8], offset: usize) -> Option<[u8; N]> {
    b.get(offset..offset.checked_add(N)?)?.try_into().ok()
}

/// The little-endian `u16` at `offset`.
pub fn le16(b: &[u8], offset: usize) -> Option<u16> {
    field(b, offset).map(u16::from_le_bytes)
}

/// The little-endian `u32` at `offset`.
pub fn le32(b: &[u8], offset: usize) -> Option<u32> {
    field(b, offset).map(u32::from_le_bytes)
}

/// The little-endian `u64` at `offset`.
pub fn le64(b: &[u8], offset: usize) -> Option<u64> {
    field(b, offset).map(u64::from_le_bytes)
}

/// The big-endian `u32` at `offset`.
pub fn be32(b: &[u8], offset: usize) -> Option<u32> {
    field(b, offset).map(u32::from_be_bytes)
}

/// The big-endian `u64` at `offset`.
pub fn be64(b: &[u8], offset: usize) -> Option<u64> {
    field(b, offset).map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_inside_and_outside() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(le16(&b, 0), Some(0x0201));
        assert_eq!(le32(&b, 1), Some(0x0504_0302));
        assert_eq!(le64(&b, 1), Some(0x0908_0706_0504_0302));
        assert_eq!(be32(&b, 0), Some(0x0102_0304));
        assert_eq!(be64(&b, 0), Some(0x0102_0304_0506_0708));
        assert_eq!(le16(&b, 8), None);
        assert_eq!(le64(&b, 2), None);
        assert_eq!(be32(&b, usize::MAX - 1), None, "no overflow");
        assert_eq!(le16(&[], 0), None);
    }

    #[test]
    fn hex_is_two_lowercase_digits_a_byte() {
        let all: Vec<u8> = (0..=255).collect();
        let expected: String = all.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex(&all), expected);
        assert_eq!(hex(&[]), "");
    }
}
