//! The data and the writes: the schema, random rows, and random INSERT,
//! UPDATE and DELETE statements made directly and through pgtier.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use rust_decimal::Decimal;

use crate::queries::{quote, JSON_STRINGS, LABELS, NAMES, NOTES, TAGS};

pub fn hex(rng: &mut StdRng, n: usize) -> String {
    (0..n).map(|_| format!("{:02x}", rng.gen::<u8>())).collect()
}

pub fn item_row(rng: &mut StdRng, id: i32) -> String {
    let cat = if rng.gen_bool(0.1) {
        "NULL".into()
    } else {
        rng.gen_range(-2..=12).to_string()
    };
    let price = if rng.gen_bool(0.1) {
        "NULL".into()
    } else {
        Decimal::new(rng.gen_range(-100_000..1_000_000), 2).to_string()
    };
    let name = item_name(rng);
    let created = if rng.gen_bool(0.1) {
        "NULL".into()
    } else {
        format!(
            "timestamptz '2020-01-01 00:00:00+00' + interval '{} seconds'",
            rng.gen_range(0..4 * 365 * 86_400)
        )
    };
    let tags = match rng.gen_range(0..8) {
        0 => "NULL".into(),
        1 => "'{}'::text[]".into(),
        2 => format!("array[{}, NULL]::text[]", quote(TAGS.choose(rng).unwrap())),
        _ => {
            let n = rng.gen_range(1..=3);
            let ts: Vec<String> = (0..n).map(|_| quote(TAGS.choose(rng).unwrap())).collect();
            format!("array[{}]::text[]", ts.join(", "))
        }
    };
    let flag = ["NULL", "true", "false"].choose(rng).unwrap();
    let payload = json_payload(rng);
    let blob = if rng.gen_bool(0.25) {
        "NULL".into()
    } else {
        let n = rng.gen_range(0..12);
        format!("'\\x{}'::bytea", hex(rng, n))
    };
    format!("({id}, {cat}, {price}, {name}, {created}, {tags}, {flag}, {payload}, {blob})")
}

pub fn item_name(rng: &mut StdRng) -> String {
    if rng.gen_bool(0.1) {
        return "NULL".into();
    }
    let base = NAMES.choose(rng).unwrap();
    if rng.gen_bool(0.5) {
        quote(base)
    } else {
        quote(&format!("{base} {}", rng.gen_range(-5..100)))
    }
}

pub fn json_payload(rng: &mut StdRng) -> String {
    match rng.gen_range(0..12) {
        0 | 1 => "NULL".into(),
        2 => "'[1, 2, \"three\"]'::jsonb".into(),
        3 => "'\"just a string\"'::jsonb".into(),
        4 => "'null'::jsonb".into(),
        _ => {
            let mut fields = Vec::new();
            if rng.gen_bool(0.8) {
                fields.push(format!("\"k\": {}", rng.gen_range(-3..10)));
            }
            if rng.gen_bool(0.6) {
                fields.push(format!("\"s\": \"{}\"", JSON_STRINGS.choose(rng).unwrap()));
            }
            if rng.gen_bool(0.5) {
                fields.push(format!(
                    "\"a\": [{}, {}, \"{}\"]",
                    rng.gen_range(0..5),
                    rng.gen_range(-1.0f64..1.0) > 0.0,
                    TAGS.choose(rng).unwrap()
                ));
            }
            if rng.gen_bool(0.2) {
                fields.push("\"n\": null, \"d\": {\"e\": [true, {\"f\": 1.5e3}]}".into());
            }
            quote(&format!("{{{}}}", fields.join(", "))) + "::jsonb"
        }
    }
}

pub fn cat_row(rng: &mut StdRng, id: i32) -> String {
    let label = if rng.gen_bool(0.1) {
        "NULL".into()
    } else {
        quote(LABELS.choose(rng).unwrap())
    };
    let parent = if rng.gen_bool(0.5) {
        "NULL".into()
    } else {
        rng.gen_range(1..=10).to_string()
    };
    format!("({id}, {label}, {parent})")
}

pub fn order_row(rng: &mut StdRng, id: i32) -> String {
    let item = if rng.gen_bool(0.05) {
        "NULL".into()
    } else {
        rng.gen_range(1..=320).to_string()
    };
    let qty = if rng.gen_bool(0.03) {
        -1
    } else {
        rng.gen_range(1..=10)
    };
    let weight = match rng.gen_range(0..40) {
        0..=3 => "NULL".into(),
        4 => "'NaN'".into(),
        5 => "'-Infinity'".into(),
        _ => (f64::from(rng.gen_range(-1000..100_000)) / 8.0).to_string(),
    };
    let note = if rng.gen_bool(0.1) {
        "NULL".into()
    } else if rng.gen_bool(0.5) {
        quote(NOTES.choose(rng).unwrap())
    } else {
        quote(&format!(
            "{} #{}",
            NOTES.choose(rng).unwrap(),
            rng.gen_range(0..50)
        ))
    };
    let placed = if rng.gen_bool(0.1) {
        "NULL".into()
    } else {
        format!("date '2020-01-01' + {}", rng.gen_range(0..1500))
    };
    let cents = if rng.gen_bool(0.1) {
        "NULL".into()
    } else {
        rng.gen_range(-10_000_000_000i64..10_000_000_000)
            .to_string()
    };
    let uuid = if rng.gen_bool(0.1) {
        "NULL".into()
    } else {
        let h = hex(rng, 16);
        format!(
            "'{}-{}-{}-{}-{}'",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    };
    format!("({id}, {item}, {qty}, {weight}, {note}, {placed}, {cents}, {uuid})")
}

pub const SCHEMA: &str = "
    create table items(id int primary key, cat int, price numeric(10,2), name text,
                       created timestamptz, tags text[], flag bool, payload jsonb, blob bytea);
    create table cats(id int primary key, label text, parent int);
    create table orders(id int primary key, item_id int, qty int, weight float8,
                        note varchar(40), placed date, total_cents int8, ref uuid);
    create view item_cats as
        select i.id, i.name, i.price, i.cat, c.label from items i left join cats c on c.id = i.cat;
    create view order_lines as
        select o.id as order_id, o.qty, o.item_id, i.price, o.qty * i.price as total
        from orders o join items i on i.id = o.item_id;";

pub fn cats_insert(rng: &mut StdRng) -> String {
    let rows: Vec<String> = (1..=10).map(|id| cat_row(rng, id)).collect();
    format!("insert into cats values {}", rows.join(", "))
}

/// Ids handed out by writes, and whether cats was truncated.
pub struct WriteState {
    pub next_item: i32,
    pub next_order: i32,
    pub next_cat: i32,
    pub cats_empty: bool,
    /// Whether the bulk rows (orders 1000001..=1001100) are in.
    pub bulk: bool,
}

/// One single-statement write, and the table it touches.
pub fn gen_write(rng: &mut StdRng, ws: &mut WriteState) -> (String, &'static str) {
    let id = rng.gen_range(1..=320);
    match rng.gen_range(0..19) {
        0 | 1 => {
            let rows: Vec<String> = (0..rng.gen_range(1..=3))
                .map(|_| {
                    ws.next_item += 1;
                    item_row(rng, ws.next_item)
                })
                .collect();
            (format!("insert into items values {}", rows.join(", ")), "items")
        }
        2 => (
            format!(
                "update items set price = price + {} where id % {} = {}",
                Decimal::new(rng.gen_range(-5000..5000), 2),
                rng.gen_range(3..10),
                rng.gen_range(0..3)
            ),
            "items",
        ),
        3 => (
            format!("update items set name = {} where id = {id}", item_name(rng)),
            "items",
        ),
        4 => (
            format!(
                "update items set cat = {} where id between {id} and {}",
                rng.gen_range(-1..=11),
                id + rng.gen_range(0..20)
            ),
            "items",
        ),
        5 => (
            format!(
                "update items set tags = array_append(tags, {}), flag = not flag where id = {id}",
                quote(TAGS.choose(rng).unwrap())
            ),
            "items",
        ),
        6 => (
            format!(
                "update items set payload = jsonb_set(coalesce(payload, '{{}}'::jsonb), '{{k}}', to_jsonb({})) \
                 where (payload is null or jsonb_typeof(payload) = 'object') and id % 11 = {}",
                rng.gen_range(-3..10),
                rng.gen_range(0..11)
            ),
            "items",
        ),
        7 => (
            format!("delete from items where id = {id} or id % 97 = {}", rng.gen_range(0..97)),
            "items",
        ),
        8 | 9 => {
            let rows: Vec<String> = (0..rng.gen_range(1..=3))
                .map(|_| {
                    ws.next_order += 1;
                    order_row(rng, ws.next_order)
                })
                .collect();
            (format!("insert into orders values {}", rows.join(", ")), "orders")
        }
        10 => (
            format!(
                "update orders set qty = qty + 1, note = {} where item_id = {id}",
                quote(NOTES.choose(rng).unwrap())
            ),
            "orders",
        ),
        11 => {
            let from = rng.gen_range(1..=400);
            (
                format!("delete from orders where id between {from} and {}", from + 5),
                "orders",
            )
        }
        12 => (
            format!(
                "update cats set label = {} where id = {}",
                quote(LABELS.choose(rng).unwrap()),
                rng.gen_range(1..=10)
            ),
            "cats",
        ),
        13 => {
            ws.next_cat += 1;
            (
                format!("insert into cats values {}", cat_row(rng, ws.next_cat)),
                "cats",
            )
        }
        14 => {
            ws.cats_empty = true;
            ("truncate cats".into(), "cats")
        }
        15 => {
            let n = rng.gen_range(0..12);
            (
                format!(
                    "update items set blob = '\\x{}'::bytea, created = created + interval '1 day' where id = {id}",
                    hex(rng, n)
                ),
                "items",
            )
        }
        16 => (
            format!(
                "update items set {} = null where id = {id}",
                ["price", "name", "cat", "tags", "payload"].choose(rng).unwrap()
            ),
            "items",
        ),
        // a key that moves: readers of the old id and of the new one must see it
        17 if rng.gen_bool(0.5) => {
            ws.next_item += 1;
            (
                format!("update items set id = {} where id = {id}", ws.next_item),
                "items",
            )
        }
        // More rows than a key report may carry (issue 14): announced for the
        // whole table, inserted and then deleted in one statement each.
        18 => {
            ws.bulk = !ws.bulk;
            let sql = if ws.bulk {
                "insert into orders select g, 1, 1, 1.5, 'bulk', date '2024-01-01', 100, null \
                 from generate_series(1000001, 1001100) g"
            } else {
                "delete from orders where id between 1000001 and 1001100"
            };
            (sql.into(), "orders")
        }
        // a write that changes nothing
        _ => ("update items set price = price where id = -1".into(), "items"),
    }
}

/// A batch of writes: cats is refilled first if it was truncated. (Ids above 10
/// are never reused, so a refill cannot collide with cats inserted since.)
pub fn gen_writes(rng: &mut StdRng, ws: &mut WriteState, n: usize) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    if ws.cats_empty {
        ws.cats_empty = false;
        out.push((cats_insert(rng), "cats"));
    }
    for _ in 0..n {
        out.push(gen_write(rng, ws));
    }
    out
}

// ---------------------------------------------------------------------------
