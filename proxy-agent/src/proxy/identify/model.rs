//! A model of what the kernel does with original-destination records (connect4/6 redirect,
//! sock_ops record at establishment and deletion at close), of the accept queues and of the
//! agent's accept loop, driven through random interleavings of connect / accept / over-limit
//! drop / close / listener and agent restarts by proptest. The agent's side is the real
//! [`check`] and [`consume`]; the records sit behind [`OriginTable`].
//!
//! Two sandboxes share one network namespace (a pod) and a small pool of client ports, so
//! tuples are reused all the time, by either sandbox, redirected or dialled straight at the
//! other sandbox's listener.
#![allow(clippy::unwrap_used, reason = "tests may unwrap")]

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;

use proptest::prelude::*;

use super::{Identity, OriginTable, check, consume};
use crate::bpf::{BpfError, ConnTuple, Recorded};

const NETNS: u64 = 1;
/// (cgroup id, listener port) of sandboxes A and B.
const SANDBOXES: [(u64, u16); 2] = [(10, 1000), (20, 2000)];
const CLIENT_PORTS: [u16; 3] = [40000, 40001, 40002];

/// Which behaviours are in place; [`Behaviour::FIXED`] is the code, [`Behaviour::OLD`] what it
/// replaced (records keyed without the listener, kept on close, left by the over-limit drop,
/// not naming their sandbox).
#[derive(Debug, Clone, Copy)]
struct Behaviour {
    key_has_listener: bool,
    kernel_forgets_on_close: bool,
    drop_consumes: bool,
    record_names_sandbox: bool,
    forget_closed_listener: bool,
    clear_at_start: bool,
}

impl Behaviour {
    const FIXED: Behaviour = Behaviour {
        key_has_listener: true,
        kernel_forgets_on_close: true,
        drop_consumes: true,
        record_names_sandbox: true,
        forget_closed_listener: true,
        clear_at_start: true,
    };
    const OLD: Behaviour = Behaviour {
        key_has_listener: false,
        kernel_forgets_on_close: false,
        drop_consumes: false,
        record_names_sandbox: false,
        forget_closed_listener: false,
        clear_at_start: false,
    };
}

/// How the kernel keys a record: (netns cookie, client port, listener port).
type Key = (u64, u16, u16);

/// The record map: keyed like the kernel keys it. Each record also remembers which
/// connection made it (the model's bookkeeping, invisible to the agent).
#[derive(Debug)]
struct Kernel {
    behaviour: Behaviour,
    records: RefCell<HashMap<Key, (Recorded, usize)>>,
    /// The connection whose record the last `take` returned.
    last_taken: std::cell::Cell<Option<usize>>,
}

impl Kernel {
    fn key(&self, t: &ConnTuple) -> Key {
        let listener = if self.behaviour.key_has_listener {
            t.listener.port()
        } else {
            0
        };
        (t.netns_cookie, t.peer.port(), listener)
    }
}

impl OriginTable for Kernel {
    fn take(&self, conn: &ConnTuple) -> Result<Option<Recorded>, BpfError> {
        let key = self.key(conn);
        let taken = self.records.borrow_mut().remove(&key);
        self.last_taken.set(taken.map(|(_, by)| by));
        let mut rec = taken.map(|(r, _)| r);
        if !self.behaviour.record_names_sandbox
            && let Some(r) = rec.as_mut()
        {
            // The old record did not say whose it was: any listener's sandbox matched.
            r.cgroup_id = SANDBOXES
                .iter()
                .find(|(_, p)| *p == conn.listener.port())
                .map_or(0, |(c, _)| *c);
        }
        Ok(rec)
    }

    fn forget_listener(&self, netns_cookie: u64, listener: SocketAddr) -> Result<usize, BpfError> {
        let mut records = self.records.borrow_mut();
        let before = records.len();
        records.retain(|k, _| !(k.0 == netns_cookie && k.2 == listener.port()));
        Ok(before - records.len())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    Open,
    /// Closed with a FIN first: FIN_WAIT1/2, CLOSING, TIME_WAIT.
    FinSent,
    Gone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    Queued { reset: bool },
    Accepted,
    Closed,
}

#[derive(Debug, Clone)]
struct Conn {
    owner: usize,
    listener: usize,
    client_port: u16,
    /// What was dialled when redirected; `None` for a direct connect to a listener.
    dst: Option<SocketAddr>,
    client: Client,
    server: Server,
    /// Its record was taken by a dead connection on the same tuple (see [`World::step`]).
    robbed: bool,
}

impl Conn {
    fn tuple(&self) -> ConnTuple {
        ConnTuple {
            netns_cookie: NETNS,
            listener: SocketAddr::from(([127, 0, 0, 1], SANDBOXES[self.listener].1)),
            peer: SocketAddr::from(([127, 0, 0, 1], self.client_port)),
        }
    }

    /// Whether an end still holds the four-tuple (a reset child in the accept queue does not).
    fn holds_tuple(&self) -> bool {
        self.client != Client::Gone
            || matches!(self.server, Server::Queued { reset: false })
            || self.server == Server::Accepted
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Sandbox `who` connects from client port `port`: redirected to dialled address `dst`,
    /// or (`direct`) straight to sandbox `to`'s listener.
    Connect {
        who: usize,
        port: usize,
        dst: u8,
        direct: bool,
        to: usize,
    },
    /// The agent accepts a connection queued on `listener` (the `pick`-th, cycling: the
    /// model does not rely on the queue's order); `over_limit` drops it.
    Accept {
        listener: usize,
        over_limit: bool,
        pick: usize,
    },
    /// A client closes (`abort`: SO_LINGER 0).
    ClientClose { conn: usize, abort: bool },
    /// The agent closes a connection it served.
    ServerClose { conn: usize },
    /// The agent closes a listener and opens it again on the same port.
    ListenerRestart { listener: usize },
    /// The agent dies and starts again.
    AgentRestart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize, 0..CLIENT_PORTS.len(), 1..4u8, any::<bool>(), 0..2usize)
            .prop_map(|(who, port, dst, direct, to)| Op::Connect { who, port, dst, direct, to }),
        4 => (0..2usize, any::<bool>(), 0..4usize)
            .prop_map(|(listener, over_limit, pick)| Op::Accept { listener, over_limit, pick }),
        3 => (0..16usize, any::<bool>()).prop_map(|(conn, abort)| Op::ClientClose { conn, abort }),
        2 => (0..16usize).prop_map(|conn| Op::ServerClose { conn }),
        1 => (0..2usize).prop_map(|listener| Op::ListenerRestart { listener }),
        1 => Just(Op::AgentRestart),
    ]
}

struct World {
    kernel: Kernel,
    conns: Vec<Conn>,
}

impl World {
    fn new(behaviour: Behaviour) -> Self {
        World {
            kernel: Kernel {
                behaviour,
                records: RefCell::new(HashMap::new()),
                last_taken: std::cell::Cell::new(None),
            },
            conns: Vec::new(),
        }
    }

    fn behaviour(&self) -> Behaviour {
        self.kernel.behaviour
    }

    /// The kernel's sock_ops state callback for a client socket going to CLOSE from a state
    /// other than FIN_WAIT1/2 or CLOSING.
    fn kernel_forget(&self, c: &Conn) {
        if self.behaviour().kernel_forgets_on_close {
            let key = self.kernel.key(&c.tuple());
            self.kernel.records.borrow_mut().remove(&key);
        }
    }

    /// The server end of `i` is reset (listener closed, agent gone).
    fn reset_server(&mut self, i: usize) {
        let c = self.conns[i].clone();
        match c.client {
            // ESTABLISHED or CLOSE_WAIT → CLOSE on the RST.
            Client::Open => self.kernel_forget(&c),
            // FIN_WAIT2 or TIME_WAIT: no deletion (the record stays for the agent's take).
            Client::FinSent | Client::Gone => {}
        }
        self.conns[i].client = Client::Gone;
        self.conns[i].server = Server::Closed;
    }

    /// Applies `op`; returns a violation of the identity property, if any.
    fn step(&mut self, op: &Op) -> Result<(), String> {
        match *op {
            Op::Connect {
                who,
                port,
                dst,
                direct,
                to,
            } => {
                let client_port = CLIENT_PORTS[port];
                let listener = if direct { to } else { who };
                let busy = self.conns.iter().any(|c| {
                    c.client_port == client_port && c.listener == listener && c.holds_tuple()
                });
                if busy {
                    return Ok(());
                }
                let dst = (!direct).then(|| SocketAddr::from(([198, 18, 0, dst], 443)));
                let conn = Conn {
                    owner: who,
                    listener,
                    client_port,
                    dst,
                    client: Client::Open,
                    server: Server::Queued { reset: false },
                    robbed: false,
                };
                if let Some(dst) = dst {
                    // sock_ops ACTIVE_ESTABLISHED: the record names the sandbox connect4 found.
                    let key = self.kernel.key(&conn.tuple());
                    let rec = Recorded {
                        dst,
                        cgroup_id: SANDBOXES[who].0,
                    };
                    let id = self.conns.len();
                    self.kernel.records.borrow_mut().insert(key, (rec, id));
                }
                self.conns.push(conn);
            }
            Op::Accept {
                listener,
                over_limit,
                pick,
            } => {
                let Some(i) = self.live(pick, |c| {
                    c.listener == listener && matches!(c.server, Server::Queued { .. })
                }) else {
                    return Ok(());
                };
                let tuple = self.conns[i].tuple();
                if over_limit {
                    if self.behaviour().drop_consumes {
                        // Unconditionally, even for a reset connection: its own record may
                        // still be there (see the module doc of `identify`).
                        self.kernel.last_taken.set(None);
                        consume(&self.kernel, &tuple);
                        self.robbed_by(i);
                    }
                    self.server_closed(i);
                    return Ok(());
                }
                let c = self.conns[i].clone();
                let reset = matches!(c.server, Server::Queued { reset: true });
                let identity = check(&self.kernel, SANDBOXES[listener].0, &tuple, || !reset);
                match identity {
                    Identity::Known(dst) => {
                        let own = self.kernel.last_taken.get() == Some(i);
                        if !(own && c.dst == Some(dst) && c.owner == listener) {
                            return Err(format!(
                                "{c:?} accepted by sandbox {listener} was served as going to {dst}"
                            ));
                        }
                        self.conns[i].server = Server::Accepted;
                    }
                    Identity::Reset => {
                        self.robbed_by(i);
                        self.server_closed(i);
                    }
                    Identity::Unknown | Identity::Mismatch | Identity::Failed(_) => {
                        if c.dst.is_some() && c.owner == listener && !reset && !c.robbed {
                            return Err(format!("{c:?} redirected and intact was refused"));
                        }
                        self.server_closed(i);
                    }
                }
            }
            Op::ClientClose { conn, abort } => {
                let Some(i) = self.live(conn, |c| c.client == Client::Open) else {
                    return Ok(());
                };
                let c = self.conns[i].clone();
                if abort {
                    self.kernel_forget(&c);
                    self.conns[i].client = Client::Gone;
                    self.conns[i].server = match c.server {
                        Server::Queued { .. } => Server::Queued { reset: true },
                        _ => Server::Closed,
                    };
                } else if c.server == Server::Closed {
                    // CLOSE_WAIT → LAST_ACK → CLOSE.
                    self.kernel_forget(&c);
                    self.conns[i].client = Client::Gone;
                } else {
                    self.conns[i].client = Client::FinSent;
                }
            }
            Op::ServerClose { conn } => {
                if let Some(i) = self.live(conn, |c| c.server == Server::Accepted) {
                    self.server_closed(i);
                }
            }
            Op::ListenerRestart { listener } => {
                let queued: Vec<usize> = (0..self.conns.len())
                    .filter(|&i| {
                        let c = &self.conns[i];
                        c.listener == listener && matches!(c.server, Server::Queued { .. })
                    })
                    .collect();
                for i in queued {
                    self.reset_server(i);
                }
                if self.behaviour().forget_closed_listener {
                    let port = SANDBOXES[listener].1;
                    self.kernel
                        .records
                        .borrow_mut()
                        .retain(|&(_, _, l), _| l != port);
                }
            }
            Op::AgentRestart => {
                let open: Vec<usize> = (0..self.conns.len())
                    .filter(|&i| self.conns[i].server != Server::Closed)
                    .collect();
                for i in open {
                    self.reset_server(i);
                }
                if self.behaviour().clear_at_start {
                    self.kernel.records.borrow_mut().clear();
                }
            }
        }
        Ok(())
    }

    /// After `i` took a record: if it was another connection's (a live one reusing the tuple
    /// of the reset `i`), that one will be refused — availability, not identity.
    fn robbed_by(&mut self, i: usize) {
        if let Some(by) = self.kernel.last_taken.get().filter(|&by| by != i) {
            self.conns[by].robbed = true;
        }
    }

    /// The agent closes its end of `i` (after serving it, or at once).
    fn server_closed(&mut self, i: usize) {
        let c = &mut self.conns[i];
        c.server = Server::Closed;
        if c.client == Client::FinSent {
            // FIN_WAIT2 → TIME_WAIT: the CLOSE callback comes from FIN_WAIT2 and keeps the
            // record, which this connection's accept already consumed.
            c.client = Client::Gone;
        }
    }

    /// The `n`-th connection (cycling) that satisfies `pred`.
    fn live(&self, n: usize, pred: impl Fn(&Conn) -> bool) -> Option<usize> {
        let matching: Vec<usize> = (0..self.conns.len())
            .filter(|&i| pred(&self.conns[i]))
            .collect();
        (!matching.is_empty()).then(|| matching[n % matching.len()])
    }
}

fn run(behaviour: Behaviour, ops: &[Op]) -> Result<(), String> {
    let mut world = World::new(behaviour);
    for (n, op) in ops.iter().enumerate() {
        world
            .step(op)
            .map_err(|e| format!("step {n} ({op:?}): {e}"))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever the interleaving, a connection is served only with its own sandbox and its own
    /// destination, and every intact redirected connection is served.
    #[test]
    fn a_connection_is_served_as_its_own_socket_only(ops in prop::collection::vec(op(), 1..60)) {
        if let Err(e) = run(Behaviour::FIXED, &ops) {
            return Err(TestCaseError::fail(e));
        }
    }
}

/// The attack of issue 13 item 2, step by step: A's over-limit connection leaves its record,
/// A reconnects from the same port straight to B's listener.
fn over_limit_then_same_port_to_the_other_listener() -> Vec<Op> {
    vec![
        Op::Connect {
            who: 0,
            port: 0,
            dst: 1,
            direct: false,
            to: 0,
        },
        Op::Accept {
            listener: 0,
            over_limit: true,
            pick: 0,
        },
        Op::ClientClose {
            conn: 0,
            abort: false,
        },
        Op::Connect {
            who: 0,
            port: 0,
            dst: 0,
            direct: true,
            to: 1,
        },
        Op::Accept {
            listener: 1,
            over_limit: false,
            pick: 0,
        },
    ]
}

#[test]
fn the_model_finds_the_attack_on_the_old_behaviour() {
    let ops = over_limit_then_same_port_to_the_other_listener();
    let old = run(Behaviour::OLD, &ops).unwrap_err();
    assert!(old.contains("was served as going to"), "{old}");
    run(Behaviour::FIXED, &ops).unwrap();
}

/// Each fix alone already stops that attack (defence in depth): none is load-bearing alone.
#[test]
fn each_fix_alone_stops_the_same_port_attack() {
    let ops = over_limit_then_same_port_to_the_other_listener();
    for fix in 0..3 {
        let b = Behaviour {
            key_has_listener: fix == 0,
            drop_consumes: fix == 1,
            record_names_sandbox: fix == 2,
            ..Behaviour::OLD
        };
        run(b, &ops).unwrap_or_else(|e| panic!("fix {fix} alone: {e}"));
    }
}

/// Without deletion on close, a record left by a reset connection is found by a direct
/// connect reusing its exact tuple once the agent closed its side — even with the other fixes.
#[test]
fn a_reset_connection_leaves_nothing_for_its_tuple() {
    let ops = vec![
        // B connects (redirected) from port 0; B resets it before the agent accepts it.
        Op::Connect {
            who: 1,
            port: 0,
            dst: 2,
            direct: false,
            to: 1,
        },
        Op::ClientClose {
            conn: 0,
            abort: true,
        },
        // The reset child no longer holds the tuple: A dials B's listener from the same port.
        Op::Connect {
            who: 0,
            port: 0,
            dst: 0,
            direct: true,
            to: 1,
        },
        // The agent takes A's connection first.
        Op::Accept {
            listener: 1,
            over_limit: false,
            pick: 1,
        },
        Op::Accept {
            listener: 1,
            over_limit: false,
            pick: 0,
        },
    ];
    let without = Behaviour {
        kernel_forgets_on_close: false,
        ..Behaviour::FIXED
    };
    let failure = run(without, &ops).unwrap_err();
    assert!(failure.contains("was served as going to"), "{failure}");
    run(Behaviour::FIXED, &ops).unwrap();
}
