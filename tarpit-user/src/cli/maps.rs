//! `tarpit maps`: each pinned map with its type, fill and capacity.
use anyhow::Result;
use clap::Args;
use serde::Serialize;

use super::Context;
use super::output::{self, Align, Table};

#[derive(Debug, Args)]
pub struct MapsArgs {
    /// Print JSON (an array of maps; fields in docs/cli.md).
    #[arg(long)]
    pub json: bool,
}

/// One map of `tarpit maps --json` (docs/cli.md).
#[derive(Debug, Serialize)]
struct MapJson {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    entries: Option<u64>,
    capacity: u32,
    key_size: u32,
    value_size: u32,
    id: u32,
}

pub fn run(ctx: &Context, args: MapsArgs) -> Result<()> {
    let maps = ctx.open()?;
    let rows = maps.map_rows()?;
    if args.json {
        let v: Vec<MapJson> = rows
            .into_iter()
            .map(|r| MapJson {
                name: r.name,
                kind: r.kind,
                entries: r.entries,
                capacity: r.capacity,
                key_size: r.key_size,
                value_size: r.value_size,
                id: r.id,
            })
            .collect();
        return output::print_json(&v);
    }
    let mut table = Table::new(&[
        ("MAP", Align::Left),
        ("TYPE", Align::Left),
        ("IN USE", Align::Right),
        ("CAPACITY", Align::Right),
        ("FILL", Align::Right),
        ("ID", Align::Right),
    ]);
    for r in &rows {
        let (used, fill) = match r.entries {
            Some(n) => (
                output::count(n),
                if r.capacity > 0 {
                    format!("{:.1}%", n as f64 * 100.0 / f64::from(r.capacity))
                } else {
                    "-".into()
                },
            ),
            None => ("-".into(), "-".into()),
        };
        table.row(vec![
            r.name.clone(),
            r.kind.clone(),
            used,
            output::count(u64::from(r.capacity)),
            fill,
            r.id.to_string(),
        ]);
    }
    println!("maps pinned at {}", maps.pin_path().display());
    table.print("no maps");
    Ok(())
}
