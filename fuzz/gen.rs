//! Input generators and mutators for the fuzz drivers: valid messages and SQL
//! from a small grammar first, then byte-level and structure-aware damage.
#![allow(dead_code)]

/// xorshift64*: deterministic from a seed, no dependency, fast enough that the
/// targets dominate the time.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    pub fn byte(&mut self, choices: &[u8]) -> u8 {
        choices[self.below(choices.len())]
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const INTERESTING_32: [i32; 12] = [0, 1, -1, 2, 3, 4, 5, 8, 0x7fff, 0x8000, i32::MAX, i32::MIN];
const INTERESTING_16: [i16; 8] = [0, 1, -1, 2, 3, 0x7fff, -0x8000, 0x100];

/// One random byte-level change.
pub fn mutate_bytes(rng: &mut Rng, v: &mut Vec<u8>, other: Option<&[u8]>) {
    let len = v.len();
    match rng.below(11) {
        0 if len > 0 => {
            let i = rng.below(len);
            v[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            v[i] = *rng.pick(&[0u8, 0xff, 0x7f, 0x80, b'\'', b'"', b'\\', b'$', b';', b'(']);
        }
        2 if len >= 4 => {
            let i = rng.below(len - 3);
            let x = *rng.pick(&INTERESTING_32);
            let x = if rng.chance(50) {
                x
            } else {
                x.wrapping_add(rng.below(9) as i32 - 4)
            };
            v[i..i + 4].copy_from_slice(&x.to_be_bytes());
        }
        3 if len >= 2 => {
            let i = rng.below(len - 1);
            v[i..i + 2].copy_from_slice(&rng.pick(&INTERESTING_16).to_be_bytes());
        }
        4 => {
            let i = rng.below(len + 1);
            let n = 1 + rng.below(8);
            for _ in 0..n {
                v.insert(i, rng.next() as u8);
            }
        }
        5 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(16));
            v.drain(i..i + n);
        }
        6 if len > 0 => {
            // duplicate a range (repeats messages, tokens)
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(64));
            let chunk: Vec<u8> = v[i..i + n].to_vec();
            let at = rng.below(len + 1);
            v.splice(at..at, chunk);
        }
        7 if len > 0 => v.truncate(rng.below(len)),
        8 => {
            if let Some(o) = other.filter(|o| !o.is_empty()) {
                // splice: our head, their tail
                let cut = rng.below(len + 1);
                let from = rng.below(o.len());
                v.truncate(cut);
                v.extend_from_slice(&o[from..]);
            }
        }
        9 if len > 0 => {
            let i = rng.below(len);
            v[i] = v[i].wrapping_add(rng.below(5) as u8).wrapping_sub(2);
        }
        _ => {
            let i = rng.below(len + 1);
            v.insert(i, 0);
        }
    }
}

/// A tagged message: tag, then a length covering itself and the body.
pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(s);
    out.push(0);
}

fn name(rng: &mut Rng) -> Vec<u8> {
    rng.pick(&["", "", "s1", "s2", "p", "a_long_statement_name_x"])
        .as_bytes()
        .to_vec()
}

/// (tag, body) pairs: a plausible frontend stream.
pub fn frontend_messages(rng: &mut Rng) -> Vec<(u8, Vec<u8>)> {
    let n = 1 + rng.below(6);
    let mut out = Vec::new();
    for _ in 0..n {
        let mut b = Vec::new();
        let tag = match rng.below(15) {
            0 | 1 => {
                cstr(&mut b, sql(rng).as_bytes());
                b'Q'
            }
            2 | 3 => {
                cstr(&mut b, &name(rng));
                cstr(&mut b, sql(rng).as_bytes());
                let k = rng.below(4);
                b.extend_from_slice(&(k as i16).to_be_bytes());
                for _ in 0..k {
                    b.extend_from_slice(&rng.pick(&[0i32, 23, 25, 1043, 3802]).to_be_bytes());
                }
                b'P'
            }
            4 | 5 => {
                cstr(&mut b, &name(rng));
                cstr(&mut b, &name(rng));
                let nf = rng.below(3);
                b.extend_from_slice(&(nf as i16).to_be_bytes());
                for _ in 0..nf {
                    b.extend_from_slice(&(rng.below(2) as i16).to_be_bytes());
                }
                let np = rng.below(4);
                b.extend_from_slice(&(np as i16).to_be_bytes());
                for _ in 0..np {
                    if rng.chance(20) {
                        b.extend_from_slice(&(-1i32).to_be_bytes());
                    } else {
                        let v = rng
                            .pick(&["1", "42", "x", "", "now", "2024-01-01"])
                            .as_bytes();
                        b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        b.extend_from_slice(v);
                    }
                }
                let nr = rng.below(3);
                b.extend_from_slice(&(nr as i16).to_be_bytes());
                for _ in 0..nr {
                    b.extend_from_slice(&(rng.below(2) as i16).to_be_bytes());
                }
                b'B'
            }
            6 => {
                b.push(rng.byte(b"SP"));
                cstr(&mut b, &name(rng));
                b'D'
            }
            7 => {
                cstr(&mut b, &name(rng));
                b.extend_from_slice(&rng.pick(&[0i32, 1, 2, -1]).to_be_bytes());
                b'E'
            }
            8 => {
                b.push(rng.byte(b"SP"));
                cstr(&mut b, &name(rng));
                b'C'
            }
            9 => b'S',
            10 => b'H',
            11 => {
                b.extend_from_slice(b"1\t2\n");
                b'd'
            }
            12 => rng.byte(b"cX"),
            13 => {
                cstr(&mut b, b"client gave up");
                b'f'
            }
            _ => {
                b.extend_from_slice(&1234i32.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 0]);
                rng.byte(b"Fp")
            }
        };
        out.push((tag, b));
    }
    out
}

/// (tag, body) pairs: a plausible backend stream.
pub fn backend_messages(rng: &mut Rng) -> Vec<(u8, Vec<u8>)> {
    let n = 1 + rng.below(6);
    let mut out = Vec::new();
    for _ in 0..n {
        let mut b = Vec::new();
        let tag = match rng.below(10) {
            0 => {
                let code = *rng.pick(&[0i32, 3, 5, 10, 11, 12, 2, 7, 8, 9]);
                b.extend_from_slice(&code.to_be_bytes());
                match code {
                    5 => b.extend_from_slice(b"salt"),
                    10 => {
                        cstr(&mut b, b"SCRAM-SHA-256");
                        b.push(0);
                    }
                    11 | 12 => b.extend_from_slice(b"r=abc,s=xyz,i=4096"),
                    _ => {}
                }
                b'R'
            }
            1 => {
                let k: &[u8] = rng.pick::<&[u8]>(&[&b"TimeZone"[..], b"DateStyle", b"search_path"]);
                cstr(&mut b, k);
                let v: &[u8] = rng.pick::<&[u8]>(&[&b"UTC"[..], b"ISO, MDY", b""]);
                cstr(&mut b, v);
                b'S'
            }
            2 => {
                b.extend_from_slice(&[0, 0, 0, 42, 1, 2, 3, 4]);
                b'K'
            }
            3 => {
                b.push(rng.byte(b"ITEX"));
                b'Z'
            }
            4 => {
                let t: &[u8] = rng.pick::<&[u8]>(&[&b"SELECT 1"[..], b"INSERT 0 1", b"SET", b""]);
                cstr(&mut b, t);
                b'C'
            }
            5 | 6 => {
                for (f, v) in [
                    (b'S', "ERROR"),
                    (b'V', "ERROR"),
                    (b'C', "42601"),
                    (b'M', "bad"),
                ] {
                    if rng.chance(85) {
                        b.push(f);
                        cstr(&mut b, v.as_bytes());
                    }
                }
                b.push(0);
                rng.byte(b"EN")
            }
            7 => {
                b.extend_from_slice(&1i16.to_be_bytes());
                cstr(&mut b, b"col");
                b.extend_from_slice(&[0; 18]);
                b'T'
            }
            8 => {
                b.extend_from_slice(&1i16.to_be_bytes());
                b.extend_from_slice(&2i32.to_be_bytes());
                b.extend_from_slice(b"42");
                b'D'
            }
            _ => rng.byte(b"123nsI"),
        };
        out.push((tag, b));
    }
    out
}

const STARTUP_KEYS: [&str; 9] = [
    "user",
    "database",
    "options",
    "application_name",
    "replication",
    "_pq_.test",
    "TimeZone",
    "client_encoding",
    "search_path",
];

/// A startup-phase packet: StartupMessage, SSL/GSS request or cancel.
pub fn startup(rng: &mut Rng) -> Vec<u8> {
    let mut body = Vec::new();
    match rng.below(8) {
        0 => body.extend_from_slice(&80877103i32.to_be_bytes()),
        1 => body.extend_from_slice(&80877104i32.to_be_bytes()),
        2 => {
            body.extend_from_slice(&80877102i32.to_be_bytes());
            body.extend_from_slice(&[0, 0, 1, 0, 9, 9, 9, 9]);
        }
        _ => {
            let minor = *rng.pick(&[0i32, 0, 0, 1, 2]);
            let major = *rng.pick(&[3i32, 3, 3, 3, 2, 4]);
            body.extend_from_slice(&((major << 16) | minor).to_be_bytes());
            for _ in 0..rng.below(5) {
                cstr(&mut body, rng.pick(&STARTUP_KEYS).as_bytes());
                cstr(
                    &mut body,
                    rng.pick(&[
                        "postgres",
                        "test",
                        "-c search_path=x",
                        "",
                        "UTC",
                        "database",
                    ])
                    .as_bytes(),
                );
            }
            body.push(0);
        }
    }
    let mut p = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

/// Encode (tag, body) pairs, sometimes damaging bodies first (lengths fixed up,
/// so the damage reaches the decoders instead of the framing).
pub fn encode_messages(rng: &mut Rng, msgs: &mut [(u8, Vec<u8>)], damage: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (tag, body) in msgs.iter_mut() {
        if damage && rng.chance(30) {
            for _ in 0..1 + rng.below(3) {
                mutate_bytes(rng, body, None);
            }
        }
        out.extend_from_slice(&msg(*tag, body));
    }
    out
}

const TABLES: [&str; 10] = [
    "t",
    "public.t",
    "pg_temp.t",
    "pg_catalog.pg_class",
    "\"Mixed Case\"",
    "s.t2",
    "information_schema.tables",
    "pg_toast.x",
    "u&\"\\0061\"",
    "t2",
];
const FUNCS: [&str; 16] = [
    "lower",
    "now",
    "random",
    "set_config",
    "pg_catalog.set_config",
    "current_setting",
    "my_func",
    "public.lower",
    "nextval",
    "coalesce",
    "generate_series",
    "pg_sleep",
    "to_regclass",
    "count",
    "abs",
    "s.f",
];
const LITERALS: [&str; 16] = [
    "1",
    "'x'",
    "'now'",
    "'today'::date",
    "E'a\\'b'",
    "$$q$$",
    "$tag$ a $$ b $tag$",
    "U&'\\0041'",
    "NULL",
    "1.5e10",
    "B'101'",
    "X'ff'",
    "'a' 'b'",
    "$1",
    "interval '1 day'",
    "'tomorrow 10:00'::timestamptz",
];

fn expr(rng: &mut Rng, depth: usize) -> String {
    if depth > 4 || rng.chance(35) {
        return if rng.chance(70) {
            rng.pick(&LITERALS).to_string()
        } else {
            rng.pick(&["a", "b", "t.a", "x.*", "*"]).to_string()
        };
    }
    match rng.below(9) {
        0 | 1 => format!(
            "{}({})",
            rng.pick(&FUNCS),
            (0..rng.below(3))
                .map(|_| expr(rng, depth + 1))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        2 => format!("({})", select(rng, depth + 1)),
        3 => format!(
            "{} {} {}",
            expr(rng, depth + 1),
            rng.pick(&[
                "+",
                "||",
                "=",
                "<",
                "AND",
                "OR",
                "IS DISTINCT FROM",
                "@>",
                "~~"
            ]),
            expr(rng, depth + 1)
        ),
        4 => format!(
            "CASE WHEN {} THEN {} ELSE {} END",
            expr(rng, depth + 1),
            expr(rng, depth + 1),
            expr(rng, depth + 1)
        ),
        5 => format!(
            "{}::{}",
            expr(rng, depth + 1),
            rng.pick(&["int", "text", "regclass", "date", "s.mytype"])
        ),
        6 => rng
            .pick(&[
                "current_user",
                "current_timestamp",
                "session_user",
                "localtime",
                "current_date",
            ])
            .to_string(),
        7 => format!("EXISTS ({})", select(rng, depth + 1)),
        _ => format!("ARRAY[{}, {}]", expr(rng, depth + 1), expr(rng, depth + 1)),
    }
}

fn from_item(rng: &mut Rng, depth: usize) -> String {
    match rng.below(6) {
        0 => format!("({}) AS sub", select(rng, depth + 1)),
        1 => format!("{} TABLESAMPLE bernoulli (10)", rng.pick(&TABLES)),
        2 => format!("{}({}) AS f", rng.pick(&FUNCS), expr(rng, depth + 1)),
        3 => format!("{} JOIN {} USING (a)", rng.pick(&TABLES), rng.pick(&TABLES)),
        4 => format!("LATERAL ({}) l", select(rng, depth + 1)),
        _ => rng.pick(&TABLES).to_string(),
    }
}

pub fn select(rng: &mut Rng, depth: usize) -> String {
    let mut s = String::new();
    if depth < 3 && rng.chance(20) {
        s.push_str(&format!(
            "WITH {} x AS ({}) ",
            if rng.chance(20) { "RECURSIVE" } else { "" },
            if rng.chance(20) {
                "DELETE FROM t RETURNING *".to_string()
            } else {
                select(rng, depth + 1)
            }
        ));
    }
    s.push_str("SELECT ");
    let cols = 1 + rng.below(3);
    s.push_str(
        &(0..cols)
            .map(|_| expr(rng, depth + 1))
            .collect::<Vec<_>>()
            .join(", "),
    );
    if rng.chance(20) {
        s.push_str(" INTO tmp_x");
    }
    if rng.chance(75) {
        s.push_str(" FROM ");
        s.push_str(&from_item(rng, depth));
    }
    if rng.chance(40) {
        s.push_str(&format!(" WHERE {}", expr(rng, depth + 1)));
    }
    if rng.chance(15) {
        let tail: &str = rng.pick::<&str>(&[
            " FOR UPDATE",
            " FOR SHARE",
            " LIMIT 1",
            " ORDER BY 1",
            " OFFSET $1",
        ]);
        s.push_str(tail);
    }
    if depth < 2 && rng.chance(10) {
        s.push_str(&format!(" UNION ALL {}", select(rng, depth + 1)));
    }
    s
}

/// A statement (or several) from a small grammar that leans on the cases the
/// analysis must get right: volatile calls, temp schemas, session commands.
pub fn sql(rng: &mut Rng) -> String {
    let stmt = match rng.below(14) {
        0..=5 => select(rng, 0),
        6 => format!(
            "SET {}{} = {}",
            rng.pick(&["", "SESSION ", "LOCAL "]),
            rng.pick(&[
                "search_path",
                "TimeZone",
                "DateStyle",
                "role",
                "standard_conforming_strings"
            ]),
            rng.pick(&["'UTC'", "public, \"$user\"", "DEFAULT", "on", "x"])
        ),
        7 => rng
            .pick(&[
                "RESET ALL",
                "RESET search_path",
                "DISCARD ALL",
                "DISCARD TEMP",
                "DEALLOCATE ALL",
                "DEALLOCATE s1",
                "SET TIME ZONE LOCAL",
                "SET search_path FROM CURRENT",
                "SET SESSION AUTHORIZATION DEFAULT",
            ])
            .to_string(),
        8 => format!(
            "{} INTO {} VALUES ({})",
            rng.pick(&["INSERT", "WITH y AS (SELECT 1) INSERT"]),
            rng.pick(&TABLES),
            expr(rng, 2)
        ),
        9 => format!(
            "UPDATE {} SET a = {} WHERE {}",
            rng.pick(&TABLES),
            expr(rng, 2),
            expr(rng, 2)
        ),
        10 => format!(
            "CREATE {}TABLE {} (a int)",
            rng.pick(&["", "TEMP ", "UNLOGGED "]),
            rng.pick(&TABLES)
        ),
        11 => format!("DO $$ BEGIN PERFORM {}; END $$", expr(rng, 2)),
        12 => format!(
            "{} {}",
            rng.pick(&["TRUNCATE", "DROP TABLE", "ALTER TABLE", "CALL"]),
            rng.pick(&TABLES)
        ),
        _ => format!("TABLE {}", rng.pick(&TABLES)),
    };
    let mut s = stmt;
    if rng.chance(10) {
        s = format!("{s}; {}", select(rng, 1));
    }
    if rng.chance(10) {
        let tail: &str = rng.pick::<&str>(&[
            " -- trailing",
            " /* open",
            " /* a /* nested */ */",
            ";",
            ";;",
            "\n",
        ]);
        s.push_str(tail);
    }
    if rng.chance(5) {
        // deep nesting: the parser's and the tree walk's stack
        let n = *rng.pick(&[50usize, 200, 1000, 5000]);
        s = format!("SELECT {}1{}", "(".repeat(n), ")".repeat(n));
    }
    s
}
