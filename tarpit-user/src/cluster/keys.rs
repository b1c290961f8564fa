//! Where things live in Redis: every key and the channel under the
//! configured prefix, so an ACL (`~tarpit:*`, `&tarpit:*`) fences tarpit
//! in and one Redis can serve other tools.
//!
//! - `{prefix}block:{net}`: one block (or its tombstone) as JSON, with the
//!   block's own expiry as the key's TTL; `{net}` is the network in its
//!   plain form (`198.51.100.7/32`, `fd5b:1e00::/64`).
//! - `{prefix}auth:{addr}/{len}`: one authenticated address, likewise;
//! - `{prefix}grey:{hex}`: one greylist key's state as JSON, the key being
//!   the same keyed 128-bit hash the local store keeps (no address, sender
//!   or recipient ever leaves the host in clear).
//! - `{prefix}grey-key`: the greylist's site key (32 hex digits), written
//!   by the first host to connect: the others hash under it too (or say
//!   why not) instead of sharing noise.
//! - `{prefix}strike:{agent}:{n}`: a strike made while Redis was gone (the
//!   agent's random id, the strike's number), stored as its message when
//!   Redis returned, for what is left of its window, for the hosts that
//!   reconnect later (strikes are otherwise only announced).
//! - `{prefix}events`: the pub/sub channel announcing each change.
use ipnet::IpNet;

use super::record::SharedList;
use crate::reputation::greylist::Id;

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// The keys of `[cluster]`: with a Redis Cluster (`nodes`) the prefix
    /// is a hash tag (`{tarpit:}block:...`), so every key of tarpit is in
    /// one slot and one node answers SCAN and MGET for all of them.
    pub fn for_config(c: &crate::config::ClusterConfig) -> Keys {
        if c.nodes.is_empty() {
            Keys::new(&c.key_prefix)
        } else {
            Keys::new(&format!("{{{}}}", c.key_prefix))
        }
    }

    /// A key of tarpit's slot (Redis Cluster): where SCAN is sent.
    pub fn slot_key(&self) -> &str {
        &self.prefix
    }

    /// The one spelling of a network in a key: truncated, IPv4-mapped
    /// addresses as IPv4, so every node names a block alike.
    pub fn canonical(net: IpNet) -> IpNet {
        let net = net.trunc();
        match net {
            IpNet::V6(v6) => match v6.network().to_ipv4_mapped() {
                Some(v4) if v6.prefix_len() >= 96 => {
                    IpNet::new(v4.into(), v6.prefix_len() - 96).unwrap_or(net)
                }
                _ => net,
            },
            IpNet::V4(_) => net,
        }
    }

    pub fn block(&self, net: IpNet) -> String {
        self.entry(SharedList::Block, net)
    }

    /// The key of an entry of `list` (`block:` or `auth:`).
    pub fn entry(&self, list: SharedList, net: IpNet) -> String {
        format!("{}{}:{}", self.prefix, list.as_str(), Keys::canonical(net))
    }

    pub fn block_pattern(&self) -> String {
        self.pattern(SharedList::Block)
    }

    pub fn pattern(&self, list: SharedList) -> String {
        format!("{}{}:*", self.prefix, list.as_str())
    }

    pub fn grey(&self, id: &Id) -> String {
        format!("{}grey:{}", self.prefix, hex::encode(id))
    }

    pub fn grey_pattern(&self) -> String {
        format!("{}grey:*", self.prefix)
    }

    /// The greylist key's id from a `grey:` key; `None` for other keys.
    pub fn grey_id(&self, key: &str) -> Option<Id> {
        let hex = key.strip_prefix(&self.prefix)?.strip_prefix("grey:")?;
        let mut id = [0u8; 16];
        hex::decode_to_slice(hex, &mut id).ok()?;
        Some(id)
    }

    pub fn grey_site_key(&self) -> String {
        format!("{}grey-key", self.prefix)
    }

    /// The key of one strike: the agent that saw it, and its number.
    pub fn strike(&self, agent: &str, seq: u64) -> String {
        format!("{}strike:{agent}:{seq}", self.prefix)
    }

    pub fn strike_pattern(&self) -> String {
        format!("{}strike:*", self.prefix)
    }

    pub fn channel(&self) -> String {
        format!("{}events", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_under_the_prefix_and_networks_are_spelled_one_way() {
        let k = Keys::new("mx:");
        let a: IpNet = "198.51.100.7/32".parse().unwrap();
        let mapped: IpNet = "::ffff:198.51.100.7/128".parse().unwrap();
        assert_eq!(k.block(a), "mx:block:198.51.100.7/32");
        assert_eq!(k.block(mapped), "mx:block:198.51.100.7/32");
        let host_bits: IpNet = "fd5b:1e00:0:7::9/64".parse().unwrap();
        assert_eq!(k.block(host_bits), "mx:block:fd5b:1e00:0:7::/64");
        assert_eq!(k.block_pattern(), "mx:block:*");
        let one: IpNet = "fd5b:1e00::60/128".parse().unwrap();
        assert_eq!(k.entry(SharedList::Auth, one), "mx:auth:fd5b:1e00::60/128");
        assert_eq!(k.pattern(SharedList::Auth), "mx:auth:*");
        assert_eq!(k.channel(), "mx:events");
        assert_eq!(
            k.strike("0123456789abcdef", 7),
            "mx:strike:0123456789abcdef:7"
        );
        assert_eq!(k.strike_pattern(), "mx:strike:*");
        assert_eq!(k.grey_site_key(), "mx:grey-key");
    }

    #[test]
    fn with_a_redis_cluster_every_key_shares_the_prefix_s_slot() {
        let c = crate::config::Config::parse("[cluster]\nnodes = [\"redis://n:7000\"]\n")
            .unwrap()
            .cluster;
        let k = Keys::for_config(&c);
        let a: IpNet = "198.51.100.7/32".parse().unwrap();
        assert_eq!(k.block(a), "{tarpit:}block:198.51.100.7/32");
        assert_eq!(k.grey_site_key(), "{tarpit:}grey-key");
        assert_eq!(k.grey_id(&k.grey(&[1; 16])), Some([1; 16]));
        assert_eq!(k.slot_key(), "{tarpit:}");
        let single = crate::config::Config::parse("[cluster]\nurl = \"redis://h\"\n")
            .unwrap()
            .cluster;
        assert_eq!(
            Keys::for_config(&single).block(a),
            "tarpit:block:198.51.100.7/32"
        );
    }

    #[test]
    fn greylist_keys_are_the_hashes_in_hex_and_read_back() {
        let k = Keys::new("tarpit:");
        let id: Id = [0xab; 16];
        let key = k.grey(&id);
        assert_eq!(key, format!("tarpit:grey:{}", "ab".repeat(16)));
        assert_eq!(k.grey_id(&key), Some(id));
        assert_eq!(k.grey_id("tarpit:grey:zz"), None);
        assert_eq!(k.grey_id("other:grey:abab"), None);
        assert_eq!(k.grey_id("tarpit:block:1.2.3.4/32"), None);
    }
}
