//! The set-up the link tests share, once: an agent connected to an in-test control, an upstream
//! in the "world" netns, sandboxes in their own netns. Fields are declared in drop order (the
//! connection and the agent go before the directories they use); a test that destructures one
//! lists the fields in reverse (`Linked { dirs, ctl, agent, conn }`), since bindings drop in
//! reverse order, and names every field it keeps alive (`_agent`, never `_` or `..`).

use std::time::Duration;

use veil_link::{AgentMsg, PROTOCOL_VERSION};
use veil_tests::{NetNs, Sandbox, TcpHello, World};

use super::{AgentProc, ControlConn, Dirs, FakeControl};

/// How long control waits for the agent to connect and say Hello.
pub const ACCEPT: Duration = Duration::from_secs(5);

/// An upstream in the world netns that answers `up <peer address>`.
pub struct Upstream {
    /// The server.
    pub hello: TcpHello,
    /// Its netns, reachable from the host.
    pub world: World,
}

impl Upstream {
    /// Starts the world and the server.
    pub fn start() -> Self {
        let world = World::new();
        let hello = TcpHello::start(world.netns(), world.upstream_v4().into(), "up");
        Self { hello, world }
    }
}

/// A sandbox cgroup whose processes run in a netns of their own (without routes until linked).
pub struct NsSandbox {
    /// The sandbox.
    pub sb: Sandbox,
    /// Its netns.
    pub ns: NetNs,
}

impl NsSandbox {
    /// Creates both, named after `tag`.
    pub fn new(tag: &str) -> Self {
        let ns = NetNs::new(tag);
        let sb = Sandbox::new(tag, Some(&ns));
        Self { sb, ns }
    }
}

/// Accepts the agent's connection and checks its Hello (protocol, a 32-hex id, a CA).
pub fn connect(ctl: &FakeControl) -> ControlConn {
    let conn = ctl.accept(ACCEPT);
    match &conn.hello {
        AgentMsg::Hello {
            protocol,
            agent_id,
            ca_pem,
        } => {
            assert_eq!(*protocol, PROTOCOL_VERSION);
            assert_eq!(agent_id.as_str().len(), 32, "{agent_id}");
            assert!(ca_pem.contains("BEGIN CERTIFICATE"), "{ca_pem}");
        }
        other => panic!("expected Hello, got {other:?}"),
    }
    conn
}

/// A fresh agent (new state and pin dirs) connected to an in-test control.
pub struct Linked {
    /// The agent's connection, Hello checked.
    pub conn: ControlConn,
    /// The agent.
    pub agent: AgentProc,
    /// The in-test control.
    pub ctl: FakeControl,
    /// Its directories.
    pub dirs: Dirs,
}

impl Linked {
    /// Starts control, then the agent, and accepts its connection.
    pub fn start() -> Self {
        let dirs = Dirs::new();
        let ctl = FakeControl::bind(&dirs.control);
        let agent = AgentProc::start(&dirs);
        let conn = connect(&ctl);
        Self {
            conn,
            agent,
            ctl,
            dirs,
        }
    }
}
