//! Generating SELECT statements: one generator per shape (items, joins,
//! views, aggregates, subqueries, DISTINCT, UNION, CTEs, statements pgtier
//! must not cache), and the pool of instances.

use rand::rngs::StdRng;
use rand::Rng;

use crate::queries::{quote, Ctx, Kind, Query, LABELS, TAGS, VOLATILE};

pub fn where_sql(pred: Option<String>, vol: Option<&str>) -> String {
    match (pred, vol) {
        (None, None) => String::new(),
        (Some(p), None) => format!(" where {p}"),
        (None, Some(v)) => format!(" where {v}"),
        (Some(p), Some(v)) => format!(" where ({p}) and {v}"),
    }
}

pub fn item_expr(cx: &mut Ctx, a: &str) -> String {
    match cx.rng.gen_range(0..42) {
        0 => format!("{a}.id"),
        1 => format!("{a}.cat"),
        2 => format!("{a}.price"),
        3 => format!("{a}.name"),
        4 => format!("{a}.created"),
        5 => format!("{a}.tags"),
        6 => format!("{a}.flag"),
        7 => format!("{a}.payload"),
        8 => format!("{a}.blob"),
        9 => format!("{a}.price * 2"),
        10 => format!("lower({a}.name)"),
        11 => format!("upper({a}.name) as up"),
        12 => format!("length({a}.name)"),
        13 => format!("coalesce({a}.name, '<none>') as nm"),
        14 => format!("coalesce({a}.cat, -1)"),
        15 => format!("{a}.price::text as price_text"),
        16 => format!("{a}.created::text"),
        17 => format!("{a}.id::text || ':' || coalesce({a}.name, '')"),
        18 => format!("{a}.payload->>'k' as k"),
        19 => format!("{a}.payload->'a'"),
        20 => format!("jsonb_typeof({a}.payload)"),
        21 => format!("{a}.tags[1] as first_tag"),
        22 => format!("cardinality({a}.tags)"),
        23 => format!("array_to_string({a}.tags, '|', '∅')"),
        24 => format!("encode({a}.blob, 'hex')"),
        25 => format!("octet_length({a}.blob)"),
        26 => format!("{a}.created::date as day"),
        27 => format!("extract(year from {a}.created) as yr"),
        28 => format!("to_char({a}.created, 'YYYY-MM-DD HH24:MI:SS')"),
        29 => format!("round({a}.price / 3, 4)"),
        30 => format!("abs({a}.price)"),
        31 => format!("{a}.flag is true as flagged"),
        32 => format!(
            "case when {a}.price > 1000 then 'high' when {a}.price < 0 then 'negative' else 'low' end as band"
        ),
        33 => format!("substr({a}.name, 2, 3)"),
        34 => format!("{a}.price + {} as shifted", cx.p(Kind::Price)),
        35 => format!("{a}.id * {} as scaled", cx.p(Kind::Small)),
        36 => format!("concat({a}.name, {}) as joined", cx.p(Kind::Name)),
        37 => format!("nullif({a}.cat, 3)"),
        38 => format!("{a}.created at time zone 'UTC' as utc"),
        39 => format!("{a}.created - timestamptz '2020-01-01 00:00:00+00' as since"),
        40 => format!("{a}.payload"),
        _ => format!("date_trunc('month', {a}.created)"),
    }
}

pub fn item_projection(cx: &mut Ctx, a: &str) -> String {
    let mut cols = Vec::new();
    if cx.chance(0.7) {
        cols.push(format!("{a}.id"));
    }
    if cx.chance(0.08) {
        cols.push(format!("{a}.*"));
    }
    for _ in 0..cx.n(1, 5) {
        cols.push(item_expr(cx, a));
    }
    cols.join(", ")
}

pub fn item_atom_with(cx: &mut Ctx, a: &str) -> String {
    match cx.rng.gen_range(0..24) {
        0 => format!("{a}.cat = {}", cx.p(Kind::Cat)),
        1 => format!(
            "{a}.cat in ({}, {}, {})",
            cx.n(-1, 11),
            cx.n(-1, 11),
            cx.n(-1, 11)
        ),
        2 => format!("{a}.cat in ({}, {})", cx.p(Kind::Cat), cx.p(Kind::Cat)),
        3 => format!(
            "{a}.price between {} and {}",
            cx.p(Kind::Price),
            cx.p(Kind::Price)
        ),
        4 => format!("{a}.price > {}", cx.p(Kind::Price)),
        5 => format!("{a}.name is null"),
        6 => format!("{a}.name is not null"),
        7 => format!("{a}.name like {}", cx.p(Kind::Like)),
        8 => format!("lower({a}.name) = lower({})", cx.p(Kind::Name)),
        9 => format!("{a}.id < {}", cx.p(Kind::Id)),
        10 => format!("{a}.id % {} = {}", cx.n(2, 9), cx.n(0, 1)),
        11 => format!("{a}.flag"),
        12 => format!("not coalesce({a}.flag, false)"),
        13 => format!("{a}.tags @> array[{}]::text[]", quote(cx.pick(TAGS))),
        14 => format!("{} = any({a}.tags)", cx.p(Kind::Tag)),
        15 => format!("{a}.payload ? 'k'"),
        16 => format!("({a}.payload->>'k')::int > {}", cx.n(0, 9)),
        17 => format!("{a}.created > timestamptz '2022-01-01 00:00:00+00'"),
        18 => format!("{a}.created::date between date '2021-01-01' and date '2022-06-30'"),
        19 => format!("{a}.blob is null"),
        20 => format!("{a}.price is distinct from {}", cx.p(Kind::Price)),
        21 => format!("({a}.cat is null or {a}.cat > {})", cx.p(Kind::Cat)),
        22 => format!("{a}.name ilike '%a%'"),
        _ => format!("{a}.id between {} and {}", cx.p(Kind::Id), cx.p(Kind::Id)),
    }
}

pub fn item_atom(cx: &mut Ctx) -> String {
    item_atom_with(cx, "i")
}

pub fn item_order(cx: &mut Ctx, a: &str) -> String {
    match cx.rng.gen_range(0..7) {
        0 => format!("{a}.id desc"),
        1 => format!("{a}.price desc nulls last, {a}.id"),
        2 => format!("{a}.name collate \"C\", {a}.id"),
        3 => format!("{a}.cat nulls first, {a}.id desc"),
        4 => format!("{a}.created, {a}.id"),
        _ => format!("{a}.id"),
    }
}

pub fn view_atom(cx: &mut Ctx) -> String {
    match cx.rng.gen_range(0..8) {
        0 => format!("v.cat = {}", cx.p(Kind::Cat)),
        1 => format!("v.price > {}", cx.p(Kind::Price)),
        2 => "v.label is null".into(),
        3 => format!("v.label like {}", cx.p(Kind::Like)),
        4 => "v.name is not null".into(),
        5 => format!("v.id < {}", cx.p(Kind::Id)),
        6 => format!(
            "v.price between {} and {}",
            cx.p(Kind::Price),
            cx.p(Kind::Price)
        ),
        _ => format!("v.label = {}", quote(cx.pick(LABELS))),
    }
}

pub fn order_atom(cx: &mut Ctx) -> String {
    match cx.rng.gen_range(0..9) {
        0 => format!("o.qty > {}", cx.p(Kind::Small)),
        1 => "o.placed >= date '2022-01-01'".into(),
        2 => format!("o.note like {}", cx.p(Kind::NoteLike)),
        3 => format!(
            "o.item_id in ({}, {}, {})",
            cx.p(Kind::Id),
            cx.p(Kind::Id),
            cx.p(Kind::Id)
        ),
        4 => "o.weight < 50.5".into(),
        5 => "o.ref is not null".into(),
        6 => "o.qty between 3 and 7".into(),
        7 => format!("o.item_id < {}", cx.p(Kind::Id)),
        _ => "o.weight = 'NaN'::float8 or o.weight is null".into(),
    }
}

pub fn order_expr(cx: &mut Ctx) -> String {
    cx.pick(&[
        "o.qty",
        "o.weight",
        "o.note",
        "o.placed",
        "o.ref",
        "o.item_id",
        "o.weight::text as wt",
        "o.placed - date '2020-01-01' as days",
        "upper(o.note)",
        "o.total_cents",
        "o.ref::text",
    ])
    .to_string()
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Vol {
    None,
    /// `random() < 2` in the projection.
    Projection,
    ForUpdate,
    /// A volatile (but always true) conjunct in WHERE.
    Where,
}

/// A single-table read of `items`.
pub fn q_items(cx: &mut Ctx, vol: Vol) -> String {
    let t = cx.table("items");
    let mut proj = item_projection(cx, "i");
    if vol == Vol::Projection {
        proj.push_str(", random() < 2 as r");
    }
    let v = (vol == Vol::Where).then(|| cx.pick(VOLATILE));
    let w = where_sql(cx.predicate(item_atom, 3), v);
    let ord = item_order(cx, "i");
    let lim = cx.limit();
    let fu = if vol == Vol::ForUpdate {
        if cx.chance(0.5) {
            " for update"
        } else {
            " for share of i"
        }
    } else {
        ""
    };
    format!("select {proj} from {t} i{w} order by {ord}{lim}{fu}")
}

/// items joined to cats.
pub fn q_items_cats(cx: &mut Ctx, vol: Vol) -> String {
    let ti = cx.table("items");
    let tc = cx.table("cats");
    let join = cx.pick(&["join", "left join"]);
    let proj = item_projection(cx, "i");
    let extra = cx.pick(&[
        "c.label",
        "c.label, c.id as cid",
        "c.parent, c.label",
        "c.*",
    ]);
    let mut pred = cx.predicate(item_atom, 2);
    if cx.chance(0.4) {
        let c = match cx.rng.gen_range(0..3) {
            0 => format!("c.label like {}", cx.p(Kind::Like)),
            1 => "c.parent is null".into(),
            _ => format!("c.id > {}", cx.p(Kind::Cat)),
        };
        pred = Some(match pred {
            Some(p) => format!("({p}) and {c}"),
            None => c,
        });
    }
    let v = (vol == Vol::Where).then(|| cx.pick(VOLATILE));
    let w = where_sql(pred, v);
    let desc = if cx.chance(0.3) { " desc" } else { "" };
    let lim = cx.limit();
    format!("select {proj}, {extra} from {ti} i {join} {tc} c on c.id = i.cat{w} order by i.id{desc}{lim}")
}

/// orders joined to items.
pub fn q_orders_items(cx: &mut Ctx, vol: Vol) -> String {
    let to = cx.table("orders");
    let ti = cx.table("items");
    let join = cx.pick(&["join", "left join"]);
    let mut cols = vec!["o.id".to_string()];
    for _ in 0..cx.n(1, 4) {
        cols.push(order_expr(cx));
    }
    cols.push("i.name".into());
    cols.push("o.qty * i.price as total".into());
    let mut pred = cx.predicate(order_atom, 2);
    if cx.chance(0.4) {
        let a = item_atom(cx);
        pred = Some(match pred {
            Some(p) => format!("({p}) or {a}"),
            None => a,
        });
    }
    let v = (vol == Vol::Where).then(|| cx.pick(VOLATILE));
    let w = where_sql(pred, v);
    let lim = cx.limit();
    format!(
        "select {} from {to} o {join} {ti} i on i.id = o.item_id{w} order by o.id{lim}",
        cols.join(", ")
    )
}

/// Reads of the two views.
pub fn q_views(cx: &mut Ctx) -> String {
    match cx.rng.gen_range(0..4) {
        0 => {
            let v = cx.view("item_cats");
            let cols = cx.pick(&[
                "v.id, v.name, v.label",
                "v.*",
                "v.id, v.price, v.cat, v.label",
                "v.id, upper(v.label) as ul, v.price * 3 as p3",
            ]);
            let w = where_sql(cx.predicate(view_atom, 3), None);
            let lim = cx.limit();
            format!("select {cols} from {v} v{w} order by v.id{lim}")
        }
        1 => {
            let v = cx.view("item_cats");
            let w = where_sql(cx.predicate(view_atom, 2), None);
            format!(
                "select v.label, count(*), sum(v.price), max(v.id) from {v} v{w} group by v.label order by v.label nulls first"
            )
        }
        2 => {
            let v = cx.view("order_lines");
            let w = if cx.chance(0.5) {
                format!(" where l.qty > {}", cx.p(Kind::Small))
            } else {
                String::new()
            };
            let lim = cx.limit();
            format!(
                "select l.item_id, count(*) as n, sum(l.total), max(l.qty) from {v} l{w} group by l.item_id order by l.item_id{lim}"
            )
        }
        _ => {
            let v = cx.view("item_cats");
            let o = cx.table("orders");
            let w = where_sql(cx.predicate(view_atom, 2), None);
            let lim = cx.limit();
            format!(
                "select v.id, v.label, o.id as oid, o.qty from {v} v join {o} o on o.item_id = v.id{w} order by o.id{lim}"
            )
        }
    }
}

/// Aggregates, grouped or not.
pub fn q_aggregate(cx: &mut Ctx, vol: Vol) -> String {
    const AGGS: &[&str] = &[
        "count(*)",
        "count(i.name)",
        "sum(i.price)",
        "min(i.price)",
        "max(i.name)",
        "avg(i.price)",
        "string_agg(i.name, ',' order by i.id)",
        "bool_or(i.flag)",
        "array_agg(i.id order by i.id)",
        "max(i.created)",
        "sum(octet_length(i.blob))",
        "count(distinct i.cat)",
        "min(i.payload->>'s')",
    ];
    let t = cx.table("items");
    let mut aggs = Vec::new();
    for _ in 0..cx.n(1, 4) {
        aggs.push(cx.pick(AGGS));
    }
    let aggs = aggs.join(", ");
    let v = (vol == Vol::Where).then(|| cx.pick(VOLATILE));
    let w = where_sql(cx.predicate(item_atom, 2), v);
    if cx.chance(0.25) {
        return format!("select {aggs} from {t} i{w}");
    }
    let key = cx.pick(&[
        "i.cat",
        "i.flag",
        "extract(year from i.created)",
        "(i.price > 100)",
        "i.tags[1]",
        "jsonb_typeof(i.payload)",
    ]);
    let having = if cx.chance(0.3) {
        format!(" having count(*) > {}", cx.p(Kind::Small))
    } else {
        String::new()
    };
    format!("select {key} as g, {aggs} from {t} i{w} group by 1{having} order by 1 nulls first")
}

pub fn q_subquery(cx: &mut Ctx) -> String {
    match cx.rng.gen_range(0..6) {
        0 => {
            let ti = cx.table("items");
            let tc = cx.table("cats");
            let to = cx.table("orders");
            let lim = cx.limit();
            format!(
                "select i.id, i.name, (select c.label from {tc} c where c.id = i.cat) as lbl from {ti} i where exists (select 1 from {to} o where o.item_id = i.id and o.qty > {}) order by i.id{lim}",
                cx.p(Kind::Small)
            )
        }
        1 => {
            let ti = cx.table("items");
            let tc = cx.table("cats");
            format!(
                "select i.id, i.price from {ti} i where i.cat in (select c.id from {tc} c where c.label like {}) order by i.id",
                cx.p(Kind::Like)
            )
        }
        2 => {
            let ti = cx.table("items");
            let ti2 = cx.table("items");
            let w = cx
                .predicate(item_atom, 1)
                .map(|p| format!(" and ({p})"))
                .unwrap_or_default();
            format!(
                "select i.id, i.price from {ti} i where i.price > (select avg(price) from {ti2}){w} order by i.id"
            )
        }
        3 => {
            let ti = cx.table("items");
            format!(
                "select s.cat, s.n, s.total from (select cat, count(*) as n, sum(price) as total from {ti} group by cat) s where s.n > {} order by s.cat nulls first",
                cx.p(Kind::Small)
            )
        }
        4 => {
            let tc = cx.table("cats");
            let ti = cx.table("items");
            format!(
                "select c.id, c.label, (select count(*) from {ti} i where i.cat = c.id) as n from {tc} c order by c.id"
            )
        }
        _ => {
            let ti = cx.table("items");
            let to = cx.table("orders");
            let lim = cx.limit();
            format!(
                "select i.id, i.name from {ti} i where i.id not in (select o.item_id from {to} o where o.item_id is not null and o.qty > {}) order by i.id{lim}",
                cx.p(Kind::Small)
            )
        }
    }
}

pub fn q_distinct(cx: &mut Ctx, vol: Vol) -> String {
    let t = cx.table("items");
    let v = (vol == Vol::Where).then(|| cx.pick(VOLATILE));
    let w = where_sql(cx.predicate(item_atom, 2), v);
    match cx.rng.gen_range(0..4) {
        0 => format!("select distinct i.cat from {t} i{w} order by i.cat nulls first"),
        1 => {
            let lim = cx.limit();
            format!("select distinct lower(i.name) as ln from {t} i{w} order by ln nulls first{lim}")
        }
        2 => format!("select count(distinct i.cat), count(distinct i.name) from {t} i{w}"),
        _ => format!(
            "select distinct on (i.cat) i.cat, i.id, i.name from {t} i{w} order by i.cat nulls first, i.id"
        ),
    }
}

pub fn q_union(cx: &mut Ctx) -> String {
    match cx.rng.gen_range(0..3) {
        0 => {
            let ti = cx.table("items");
            let tc = cx.table("cats");
            let w = where_sql(cx.predicate(item_atom, 2), None);
            let kind = cx.pick(&["union all", "union"]);
            let lim = cx.limit();
            format!(
                "select i.id, i.name as n from {ti} i{w} {kind} select c.id, c.label from {tc} c where c.id > {} order by 1, 2 nulls first{lim}",
                cx.p(Kind::Cat)
            )
        }
        1 => {
            let ti = cx.table("items");
            let to = cx.table("orders");
            format!("select i.cat as k from {ti} i union select o.qty from {to} o order by 1 nulls first")
        }
        _ => {
            let ti = cx.table("items");
            let to = cx.table("orders");
            let tc = cx.table("cats");
            format!(
                "select 'items' as src, count(*) from {ti} union all select 'orders', count(*) from {to} union all select 'cats', count(*) from {tc} order by 1"
            )
        }
    }
}

/// CTEs, including CTE names that shadow the tables their bodies read.
pub fn q_cte(cx: &mut Ctx) -> String {
    match cx.rng.gen_range(0..4) {
        0 => {
            let ti = cx.table("items");
            let tc = cx.table("cats");
            let w = where_sql(cx.predicate(item_atom, 2), None);
            format!(
                "with t as (select i.cat, sum(i.price) as s, count(*) as n from {ti} i{w} group by i.cat) select t.cat, t.s, t.n, c.label from t left join {tc} c on c.id = t.cat order by t.cat nulls first"
            )
        }
        1 => {
            // the CTE `cats` reads the real table cats
            let ti = cx.table("items");
            cx.tables.push("cats");
            let lim = cx.limit();
            format!(
                "with cats as (select id, upper(label) as label from cats where id > {}) select i.id, i.name, cats.label from {ti} i join cats on cats.id = i.cat order by i.id{lim}",
                cx.p(Kind::Cat)
            )
        }
        2 => {
            // the CTE `items` reads the real table items
            cx.tables.push("items");
            format!(
                "with items as (select * from items where price > {}) select count(*), sum(price), max(id) from items",
                cx.p(Kind::Price)
            )
        }
        _ => {
            let to = cx.table("orders");
            format!(
                "with x as (select item_id, sum(qty) as q from {to} group by item_id) select a.item_id, a.q, b.q as q2 from x a join x b on b.item_id = a.item_id + 1 order by a.item_id"
            )
        }
    }
}

pub fn q_misc(cx: &mut Ctx) -> String {
    match cx.rng.gen_range(0..7) {
        0 => format!(
            "select {} + 1 as a, {} as b, {} * 2 as c",
            cx.p(Kind::Small),
            cx.p(Kind::Name),
            cx.p(Kind::Price)
        ),
        1 => "values (1, 'x'::text), (2, null), (3, 'ü')".into(),
        2 => format!(
            "select count(*), sum(g) from generate_series(1, {}) g",
            cx.p(Kind::Id)
        ),
        3 => {
            let to = cx.table("orders");
            format!(
                "select o.placed, count(*) from {to} o group by o.placed order by o.placed nulls first limit 10"
            )
        }
        4 => {
            cx.tables.push("cats");
            "table cats order by id".into()
        }
        5 => {
            let tc = cx.table("cats");
            format!("select * from {tc} order by id")
        }
        _ => {
            let ti = cx.table("items");
            format!("select * from {ti} i where i.id = {}", cx.p(Kind::Id))
        }
    }
}

pub fn gen_query(rng: &mut StdRng) -> Query {
    let mut cx = Ctx {
        rng,
        params: Vec::new(),
        tables: Vec::new(),
    };
    let volatile = cx.chance(0.1);
    let sql = if volatile {
        match cx.rng.gen_range(0..6) {
            0 => q_items(&mut cx, Vol::ForUpdate),
            1 => q_items(&mut cx, Vol::Projection),
            2 => q_items(&mut cx, Vol::Where),
            3 => q_items_cats(&mut cx, Vol::Where),
            4 => q_orders_items(&mut cx, Vol::Where),
            _ => q_aggregate(&mut cx, Vol::Where),
        }
    } else {
        match cx.rng.gen_range(0..100) {
            0..=17 => q_items(&mut cx, Vol::None),
            18..=27 => q_items_cats(&mut cx, Vol::None),
            28..=37 => q_orders_items(&mut cx, Vol::None),
            38..=49 => q_views(&mut cx),
            50..=61 => q_aggregate(&mut cx, Vol::None),
            62..=71 => q_subquery(&mut cx),
            72..=78 => q_distinct(&mut cx, Vol::None),
            79..=85 => q_union(&mut cx),
            86..=92 => q_cte(&mut cx),
            _ => q_misc(&mut cx),
        }
    };
    let Ctx {
        params, mut tables, ..
    } = cx;
    tables.sort();
    tables.dedup();
    Query {
        sql,
        params,
        tables,
        volatile,
        last_round: None,
        last_result: None,
    }
}

/// A new template, with a second parameter set when it has parameters.
pub fn gen_instances(rng: &mut StdRng) -> Vec<Query> {
    let q = gen_query(rng);
    if !q.params.is_empty() && rng.gen_bool(0.5) {
        let other = q.with_new_values(rng);
        vec![q, other]
    } else {
        vec![q]
    }
}

// ---------------------------------------------------------------------------
