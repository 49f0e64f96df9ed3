//! Value identity for key-level invalidation: one spelling per value, the one
//! Postgres prints for it (`col::text`), whatever way the request gave it (a
//! text or binary Bind parameter, a literal, a cast literal).
//!
//! A write reports the keys it changed as Postgres renders them; a cached
//! result is tagged with the keys its request asked for, rendered here. The two
//! must agree exactly, or a write would miss the entries it changes: so every
//! input Postgres might read differently from this code (a spelling Postgres
//! rejects, an encoding, a type outside the supported set) gives `None`, and the
//! statement stays invalidated per table. `tests/key_values.rs` checks these
//! functions against the server.

/// A column type whose values can be key tags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    Int2,
    Int4,
    Int8,
    /// `text` and `varchar` (deterministic collation, so `=` compares bytes;
    /// the caller checks it, and that the session is UTF-8 throughout).
    Text,
    Uuid,
    Bool,
}

impl KeyType {
    /// The key type of a column or parameter type OID.
    pub fn from_oid(oid: u32) -> Option<KeyType> {
        Some(match oid {
            21 => KeyType::Int2,
            23 => KeyType::Int4,
            20 => KeyType::Int8,
            25 | 1043 => KeyType::Text,
            2950 => KeyType::Uuid,
            16 => KeyType::Bool,
            _ => return None,
        })
    }

    /// The element type of an array type OID (`int8[]`, as a client may
    /// declare an `= ANY($1)` parameter).
    pub fn from_array_oid(oid: u32) -> Option<KeyType> {
        Some(match oid {
            1005 => KeyType::Int2,
            1007 => KeyType::Int4,
            1016 => KeyType::Int8,
            1009 | 1015 => KeyType::Text,
            2951 => KeyType::Uuid,
            1000 => KeyType::Bool,
            _ => return None,
        })
    }

    fn is_int(self) -> bool {
        matches!(self, KeyType::Int2 | KeyType::Int4 | KeyType::Int8)
    }

    /// Whether a value of type `self` compared with `=` to a column of type
    /// `column` matches exactly the rows whose column prints as the value does.
    pub fn compares_with(self, column: KeyType) -> bool {
        self == column || (self.is_int() && column.is_int())
    }
}

/// The canonical spelling of a value given in text form (a text-format Bind
/// parameter, or a quoted literal) as the input function of `ty` reads it.
pub fn from_text(ty: KeyType, input: &[u8]) -> Option<String> {
    match ty {
        KeyType::Int2 => int_text(input, i16::MIN.into(), i16::MAX.into()),
        KeyType::Int4 => int_text(input, i32::MIN.into(), i32::MAX.into()),
        KeyType::Int8 => int_text(input, i64::MIN, i64::MAX),
        KeyType::Text => {
            // The server stores text without NUL bytes; other bytes are the
            // caller's business (it keys only UTF-8 sessions).
            let s = std::str::from_utf8(input).ok()?;
            (!s.contains('\0')).then(|| s.to_string())
        }
        KeyType::Uuid => uuid_text(input),
        KeyType::Bool => bool_text(input),
    }
}

/// The canonical spelling of a binary-format Bind parameter of type `ty`.
pub fn from_binary(ty: KeyType, input: &[u8]) -> Option<String> {
    match (ty, input.len()) {
        (KeyType::Int2, 2) => Some(i16::from_be_bytes([input[0], input[1]]).to_string()),
        (KeyType::Int4, 4) => {
            Some(i32::from_be_bytes([input[0], input[1], input[2], input[3]]).to_string())
        }
        (KeyType::Int8, 8) => {
            let mut b = [0u8; 8];
            b.copy_from_slice(input);
            Some(i64::from_be_bytes(b).to_string())
        }
        (KeyType::Text, _) => from_text(KeyType::Text, input),
        (KeyType::Uuid, 16) => Some(uuid_string(input)),
        // boolrecv: any non-zero byte is true.
        (KeyType::Bool, 1) => Some(if input[0] != 0 { "true" } else { "false" }.to_string()),
        _ => None,
    }
}

/// Why a value given for a key leaves its read table-level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A NULL, or an array with a NULL element.
    Null,
    /// More key tuples than a read may depend on (a long array or IN list).
    TooMany,
    /// A spelling, type or array form pgtier cannot render exactly as
    /// Postgres would read it (an empty or multi-dimensional array too).
    Unreadable,
    /// A text key in a session whose client or server encoding is not UTF-8
    /// (Postgres converts what pgtier sees; the write reports server bytes).
    Encoding,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Null => "null",
            Refusal::TooMany => "too_many",
            Refusal::Unreadable => "unreadable",
            Refusal::Encoding => "encoding",
        }
    }
}

/// `array_isspace`: what `array_in` skips around elements and braces.
fn array_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// The elements of a one-dimensional array given in text form (`array_in`:
/// `{1, "2", 3}`), each rendered as `ty` reads it; refused unless it has at
/// least one and at most `max` non-NULL elements in plain braces (no
/// dimension decoration `[1:2]=`, no nesting, no backslash outside quotes).
pub fn array_from_text(ty: KeyType, input: &[u8], max: usize) -> Result<Vec<String>, Refusal> {
    array_text(ty, input, max).unwrap_or(Err(Refusal::Unreadable))
}

fn array_text(ty: KeyType, input: &[u8], max: usize) -> Option<Result<Vec<String>, Refusal>> {
    let skip = |mut i: usize| {
        while input.get(i).is_some_and(|b| array_space(*b)) {
            i += 1;
        }
        i
    };
    let mut i = skip(0);
    if input.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut out = Vec::new();
    let mut elem = Vec::new();
    loop {
        if out.len() == max {
            return Some(Err(Refusal::TooMany));
        }
        i = skip(i);
        elem.clear();
        if input.get(i) == Some(&b'"') {
            i += 1;
            loop {
                match *input.get(i)? {
                    b'"' => break,
                    b'\\' => {
                        i += 1;
                        elem.push(*input.get(i)?);
                    }
                    b => elem.push(b),
                }
                i += 1;
            }
            i = skip(i + 1);
        } else {
            let start = i;
            while let Some(&b) = input.get(i) {
                match b {
                    b',' | b'}' => break,
                    b'{' | b'"' | b'\\' => return None,
                    _ => i += 1,
                }
            }
            let mut e = &input[start..i];
            while let [rest @ .., last] = e {
                if !array_space(*last) {
                    break;
                }
                e = rest;
            }
            // An unquoted NULL is a NULL element: it matches no row, but the
            // rule stays simple (the read is left table-level).
            if e.eq_ignore_ascii_case(b"NULL") {
                return Some(Err(Refusal::Null));
            }
            if e.is_empty() {
                return None;
            }
            elem.extend_from_slice(e);
        }
        out.push(from_text(ty, &elem)?);
        match input.get(i)? {
            b',' => i += 1,
            b'}' => break,
            _ => return None,
        }
    }
    (skip(i + 1) == input.len()).then_some(Ok(out))
}

/// The elements of a one-dimensional array Bind parameter in binary form
/// (`array_recv`: ndim, flags, element type, dimension and lower bound, then
/// each element's length and bytes), each rendered as `ty`; refused for
/// anything else, a NULL element, or more than `max` elements.
pub fn array_from_binary(ty: KeyType, input: &[u8], max: usize) -> Result<Vec<String>, Refusal> {
    array_binary(ty, input, max).unwrap_or(Err(Refusal::Unreadable))
}

fn array_binary(ty: KeyType, input: &[u8], max: usize) -> Option<Result<Vec<String>, Refusal>> {
    let mut rest = input;
    let int = |rest: &mut &[u8]| -> Option<i32> {
        let (head, tail) = rest.split_first_chunk::<4>()?;
        *rest = tail;
        Some(i32::from_be_bytes(*head))
    };
    let (ndim, flags, element) = (int(&mut rest)?, int(&mut rest)?, int(&mut rest)?);
    let (dim, _lower_bound) = (int(&mut rest)?, int(&mut rest)?);
    // array_recv refuses an element type other than the parameter's.
    let element_type = KeyType::from_oid(u32::from_be_bytes(element.to_be_bytes()));
    if ndim != 1 || !(0..=1).contains(&flags) || element_type != Some(ty) {
        return None;
    }
    let n = usize::try_from(dim).ok().filter(|n| *n >= 1)?;
    if n > max {
        return Some(Err(Refusal::TooMany));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = int(&mut rest)?;
        if len == -1 {
            return Some(Err(Refusal::Null));
        }
        let (value, tail) = rest.split_at_checked(usize::try_from(len).ok()?)?;
        out.push(from_binary(ty, value)?);
        rest = tail;
    }
    rest.is_empty().then_some(Ok(out))
}

/// An integer as `int2in`/`int4in`/`int8in` read it (Postgres 15: optional
/// surrounding whitespace, an optional sign, decimal digits); anything else
/// (hex, underscores, out of range) is refused.
fn int_text(input: &[u8], min: i64, max: i64) -> Option<String> {
    let s = std::str::from_utf8(input).ok()?;
    let t = s.trim_matches(space);
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let v: i64 = t.strip_prefix('+').unwrap_or(t).parse().ok()?;
    (min..=max).contains(&v).then(|| v.to_string())
}

/// C's `isspace`, which the input functions skip (Rust's ASCII whitespace
/// leaves out vertical tab).
fn space(c: char) -> bool {
    c.is_ascii_whitespace() || c == '\x0b'
}

/// `uuid_in`: 32 hex digits, in either case, optionally in braces, with an
/// optional hyphen after any group of four digits but the last.
fn uuid_text(input: &[u8]) -> Option<String> {
    let inner = match input {
        [b'{', rest @ ..] => rest.strip_suffix(b"}")?,
        _ => input,
    };
    let mut bytes = [0u8; 16];
    let mut at = 0;
    for (i, b) in bytes.iter_mut().enumerate() {
        let hi = hex(*inner.get(at)?)?;
        let lo = hex(*inner.get(at + 1)?)?;
        *b = hi << 4 | lo;
        at += 2;
        if inner.get(at) == Some(&b'-') && i % 2 == 1 && i < 15 {
            at += 1;
        }
    }
    (at == inner.len()).then(|| uuid_string(&bytes))
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn uuid_string(b: &[u8]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `boolin`: surrounding whitespace, any case, a unique prefix of true, yes,
/// false, no (at least two letters of on/off), or 1/0.
fn bool_text(input: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(input).ok()?;
    let t = s.trim_matches(space).to_ascii_lowercase();
    let prefix_of = |word: &str, min: usize| t.len() >= min && word.starts_with(t.as_str());
    let v = if prefix_of("true", 1) || prefix_of("yes", 1) || t == "on" || t == "1" {
        true
    } else if prefix_of("false", 1) || prefix_of("no", 1) || prefix_of("off", 2) || t == "0" {
        false
    } else {
        return None;
    };
    Some(if v { "true" } else { "false" }.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_in_every_spelling_postgres_accepts() {
        for s in ["7", "007", " 7 ", "+7", "\t7\n"] {
            assert_eq!(
                from_text(KeyType::Int4, s.as_bytes()).as_deref(),
                Some("7"),
                "{s:?}"
            );
        }
        assert_eq!(from_text(KeyType::Int8, b"-0").as_deref(), Some("0"));
        for s in ["", "+", "7.0", "0x7", "1_000", "7e0", "32768"] {
            assert_eq!(from_text(KeyType::Int2, s.as_bytes()), None, "{s:?}");
        }
        assert_eq!(
            from_binary(KeyType::Int4, &7i32.to_be_bytes()).as_deref(),
            Some("7")
        );
        assert_eq!(
            from_binary(KeyType::Int8, &(-1i64).to_be_bytes()).as_deref(),
            Some("-1")
        );
        assert_eq!(
            from_binary(KeyType::Int4, &7i64.to_be_bytes()),
            None,
            "wrong width"
        );
    }

    #[test]
    fn uuids_in_every_spelling_postgres_accepts() {
        let want = Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".to_string());
        for s in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
            "{a0eebc999c0b4ef8bb6d6bb9bd380a11}",
        ] {
            assert_eq!(from_text(KeyType::Uuid, s.as_bytes()), want, "{s}");
        }
        for s in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-",
            "a0e-ebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            " a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        ] {
            assert_eq!(from_text(KeyType::Uuid, s.as_bytes()), None, "{s}");
        }
    }

    #[test]
    fn booleans_in_every_spelling_postgres_accepts() {
        for s in ["t", "TRUE", " yes ", "y", "on", "1", "tru"] {
            assert_eq!(
                from_text(KeyType::Bool, s.as_bytes()).as_deref(),
                Some("true"),
                "{s}"
            );
        }
        for s in ["f", "False", "n", "no", "of", "off", "0"] {
            assert_eq!(
                from_text(KeyType::Bool, s.as_bytes()).as_deref(),
                Some("false"),
                "{s}"
            );
        }
        for s in ["o", "2", "truee", ""] {
            assert_eq!(from_text(KeyType::Bool, s.as_bytes()), None, "{s}");
        }
        assert_eq!(from_binary(KeyType::Bool, &[2]).as_deref(), Some("true"));
    }

    fn binary_array(element: u32, items: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [1, 0, element as i32, items.len() as i32, 1] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        for item in items {
            match item {
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b
    }

    #[test]
    fn arrays_in_text_form() {
        let ints = |s: &str| array_from_text(KeyType::Int8, s.as_bytes(), 64).ok();
        let want = Some(vec!["1".to_string(), "-2".into(), "3".into()]);
        for s in ["{1,-2,3}", " { 1 , \"-002\" ,\t+3 } ", "{\"1\",\" -2\",3}"] {
            assert_eq!(ints(s), want, "{s:?}");
        }
        for s in [
            "{}",
            "{1,,2}",
            "{1,NULL}",
            "{null}",
            "{{1,2}}",
            "[1:2]={1,2}",
            "{1,2} x",
            "{1,2",
            "1,2",
            "{\"1\"2}",
            "{1\\2}",
            "{1.5}",
        ] {
            assert_eq!(ints(s), None, "{s:?}");
        }
        assert_eq!(
            array_from_text(KeyType::Text, br#"{ a b ,"NULL","x\"y\\", "" }"#, 64),
            Ok(vec![
                "a b".to_string(),
                "NULL".into(),
                "x\"y\\".into(),
                String::new()
            ])
        );
        assert_eq!(
            array_from_text(KeyType::Int4, b"{1,2,3}", 2),
            Err(Refusal::TooMany)
        );
        assert_eq!(
            array_from_text(KeyType::Int4, b"{1, Null}", 2),
            Err(Refusal::Null)
        );
    }

    #[test]
    fn arrays_in_binary_form() {
        let seven = 7i32.to_be_bytes();
        let eight = 8i32.to_be_bytes();
        let b = binary_array(23, &[Some(&seven), Some(&eight)]);
        assert_eq!(
            array_from_binary(KeyType::Int4, &b, 64),
            Ok(vec!["7".to_string(), "8".into()])
        );
        assert_eq!(
            array_from_binary(KeyType::Int4, &b, 1),
            Err(Refusal::TooMany)
        );
        let unreadable = Err(Refusal::Unreadable);
        assert_eq!(
            array_from_binary(KeyType::Int8, &b, 64),
            unreadable,
            "int4 elements"
        );
        let with_null = binary_array(23, &[Some(&seven), None]);
        assert_eq!(
            array_from_binary(KeyType::Int4, &with_null, 64),
            Err(Refusal::Null)
        );
        let mut trailing = b.clone();
        trailing.push(0);
        assert_eq!(array_from_binary(KeyType::Int4, &trailing, 64), unreadable);
        assert_eq!(
            array_from_binary(KeyType::Int4, &b[..b.len() - 1], 64),
            unreadable
        );
        let empty = binary_array(23, &[]);
        assert_eq!(array_from_binary(KeyType::Int4, &empty, 64), unreadable);
        let t = binary_array(25, &[Some(b"a,b"), Some(b"")]);
        assert_eq!(
            array_from_binary(KeyType::Text, &t, 64),
            Ok(vec!["a,b".to_string(), String::new()])
        );
        assert_eq!(KeyType::from_array_oid(1016), Some(KeyType::Int8));
        assert_eq!(KeyType::from_array_oid(20), None);
    }

    #[test]
    fn integer_types_compare_across_widths_and_nothing_else_does() {
        assert!(KeyType::Int8.compares_with(KeyType::Int4));
        assert!(!KeyType::Text.compares_with(KeyType::Int4));
        assert!(!KeyType::Uuid.compares_with(KeyType::Text));
    }
}
