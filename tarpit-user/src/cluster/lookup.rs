//! What Redis says of a few blocks, for `tarpit ip`: who blocked (or
//! deleted) a network, when, until when. One connection, one MGET, each
//! bounded by `cluster.timeout`; on its own small runtime, since the
//! command line has none.
use std::time::Duration;

use anyhow::{Result, anyhow};
use ipnet::IpNet;

use super::keys::Keys;
use super::record::BlockRecord;
use crate::config::ClusterConfig;

/// The shared records of `nets` (those Redis has), in `nets`' order.
pub fn blocks_of(config: &ClusterConfig, nets: &[IpNet]) -> Result<Vec<BlockRecord>> {
    if nets.is_empty() {
        return Ok(Vec::new());
    }
    let mut source = super::Source::from_config(config)?;
    let keys = Keys::for_config(config);
    let names: Vec<String> = nets.iter().map(|n| keys.block(*n)).collect();
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
        .flatten()
        .filter_map(|v| serde_json::from_str(&v).ok())
        .collect())
}
