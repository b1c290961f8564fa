//! What Redis says of a few blocks and allow entries, for `tarpit ip`:
//! who blocked or allowed (or deleted) a network, when, until when, with
//! the admin's comment. One connection, one MGET, each
//! bounded by `cluster.timeout`; on its own small runtime, since the
//! command line has none.
use std::time::Duration;

use anyhow::{Result, anyhow};
use ipnet::IpNet;

use super::keys::Keys;
use super::record::{BlockRecord, SharedList};
use crate::config::ClusterConfig;

/// The shared records of `entries` (a list and a network each; those
/// Redis has), in `entries`' order.
pub fn records_of(
    config: &ClusterConfig,
    entries: &[(SharedList, IpNet)],
) -> Result<Vec<BlockRecord>> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let mut source = super::Source::from_config(config)?;
    let keys = Keys::for_config(config);
    let names: Vec<String> = entries.iter().map(|(l, n)| keys.entry(*l, *n)).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let wait = config.timeout.max(Duration::from_millis(500));
    let values: Vec<Option<String>> = rt.block_on(async {
        let client = tokio::time::timeout(wait, source.client())
            .await
            .map_err(|_| anyhow!("Redis did not answer within {wait:?}"))??;
        let cc = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(wait))
            .set_response_timeout(Some(wait));
        let mut conn = tokio::time::timeout(
            wait,
            client.get_multiplexed_async_connection_with_config(&cc),
        )
        .await
        .map_err(|_| anyhow!("Redis did not answer within {wait:?}"))??;
        let v = tokio::time::timeout(wait, redis::cmd("MGET").arg(&names).query_async(&mut conn))
            .await
            .map_err(|_| anyhow!("Redis did not answer within {wait:?}"))??;
        Ok::<_, anyhow::Error>(v)
    })?;
    Ok(values
        .into_iter()
        .zip(entries)
        .filter_map(|(v, (list, _))| {
            let r: BlockRecord = serde_json::from_str(&v?).ok()?;
            (r.list == *list).then_some(r)
        })
        .collect())
}
