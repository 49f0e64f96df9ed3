fn main() {
    let sql = std::env::args().nth(1).unwrap();
    let p = pg_query::parse(&sql, 0).unwrap();
    for s in &p.protobuf.stmts {
        println!(
            "{}",
            serde_json::to_string(s.stmt.as_ref().unwrap()).unwrap()
        );
    }
}
