//! SMTP as the agent needs it: command classification, reply parsing and
//! EHLO rewriting, a bounded line buffer, and the end-of-data scanner.
//!
//! Nothing here does I/O or depends on the kernel object, so the fuzz
//! target and the unit tests build it alone. The agent is a relay, not an
//! MTA: it classifies what passes (to apply policy) and forwards the bytes
//! as they came; the MTA stays the judge of syntax.
pub mod codec;
pub mod command;
pub mod data;
#[doc(hidden)]
pub mod fuzz;
pub mod reply;

pub use codec::{LineBuf, LineError};
pub use command::{Command, parse_command};
pub use data::DotScanner;
pub use reply::{Reply, ReplyAssembler, ReplyError, ReplyLine, parse_reply_line};
