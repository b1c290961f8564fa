//! SMTP as the agent reads it: the client's stream read strictly and
//! forwarded canonically, the MTA's replies parsed and EHLO rewritten.
//!
//! The agent is the strictest reader on the path. A command line ends only
//! at CRLF (a bare CR, LF or NUL refuses it), a DATA body only at
//! CRLF.CRLF, and what reaches the MTA is written anew: commands in one
//! canonical spelling, the body re-encoded with CRLF line ends and its
//! dots stuffed again, BDAT chunks counted by length. So whatever the MTA
//! behind it is, it finds no command and no end of data the agent did not
//! see (SMTP smuggling), and every policy applies to all it gets. The MTA
//! stays the judge of syntax: unknown commands are forwarded, and their
//! replies relayed.
//!
//! Nothing here does I/O: the session and the backend read into a
//! [`LineBuf`]'s spare room (`read_buf(buf.spare())`, cancel-safe) and hand
//! the bytes over, and nothing depends on the kernel object, so the fuzz
//! target and the unit tests build it alone, without a runtime.
pub mod body;
pub mod codec;
pub mod command;
#[doc(hidden)]
pub mod fuzz;
pub mod line;
pub mod reader;
pub mod reply;

pub use body::{BareLineEnding, BodyEncoder, BodyStep};
pub use codec::{LineBuf, LineError};
pub use command::{Command, canonical, parse_command};
pub use line::{LineFault, strict_line};
pub use reader::{ClientReader, Expect, Item};
pub use reply::{Reply, ReplyAssembler, ReplyError, ReplyLine, parse_reply_line};
