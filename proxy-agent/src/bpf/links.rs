//! The programs' links on each sandbox cgroup, pinned under `<pins>/sandboxes/<cgroup id>/` so
//! the redirect outlives the agent.

use std::fs::File;
use std::io;
use std::os::fd::AsFd as _;
use std::path::Path;

use aya::programs::{CgroupAttachMode, links::FdLink};

use super::error::{BpfError, program_err};
use super::programs::{PROGRAMS, SOCK_OPS_PROGRAM, sock_addr_program, sock_ops_program};
use super::sys::{link_detach, link_update, obj_get};
use super::{Bpf, LinkOutcome, LinkReport};

impl Bpf {
    /// Makes sure every program is linked to the cgroup through a pin under
    /// `<pins>/sandboxes/<cgroup_id>/`: a pin that opens as a link is kept (never attached a
    /// second time); a missing one is attached and pinned, a dead one replaced. On failure,
    /// the links this call newly attached are removed again and the others are left alone.
    pub fn ensure_links(
        &mut self,
        cgroup_dir: &Path,
        cgroup_id: u64,
    ) -> Result<LinkReport, BpfError> {
        let dir = self.pins.sandbox_dir(cgroup_id);
        self.ensure_links_at(cgroup_dir, &dir, &PROGRAMS)
    }

    /// [`Self::ensure_links`] for `programs` pinned as `<dir>/<program>` (a guarded runtime
    /// parent gets the refusing subset under its own directory).
    pub fn ensure_links_at(
        &mut self,
        cgroup_dir: &Path,
        dir: &Path,
        programs: &[&'static str],
    ) -> Result<LinkReport, BpfError> {
        let cgroup_err = |source| BpfError::Cgroup {
            path: cgroup_dir.to_owned(),
            source,
        };
        let cgroup = File::open(cgroup_dir).map_err(cgroup_err)?;
        std::fs::create_dir_all(dir).map_err(|source| BpfError::Pin {
            path: dir.to_owned(),
            source,
        })?;
        let mut report = LinkReport::default();
        let mut new_pins = Vec::new();
        for &name in programs {
            let path = dir.join(name);
            match self.ensure_link(&cgroup, name, &path) {
                Ok(LinkOutcome::Attached) => {
                    report.attached += 1;
                    new_pins.push(path);
                }
                Ok(LinkOutcome::Replaced) => report.replaced += 1,
                Ok(LinkOutcome::Kept) => report.reused += 1,
                Err(e) => {
                    for pin in new_pins.iter().rev() {
                        let _ = std::fs::remove_file(pin);
                    }
                    return Err(e);
                }
            }
        }
        Ok(report)
    }

    fn ensure_link(
        &mut self,
        cgroup: &File,
        name: &'static str,
        path: &Path,
    ) -> Result<LinkOutcome, BpfError> {
        let pin_err = |source| BpfError::Pin {
            path: path.to_owned(),
            source,
        };
        let old = match obj_get(path) {
            Ok(fd) => Some(fd),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            // Not a bpf object: a stray file, replaced below.
            Err(_) => {
                std::fs::remove_file(path).map_err(pin_err)?;
                None
            }
        };
        if let Some(old) = &old {
            // Kept, never attached twice; but switched over to this agent's program (same
            // pinned maps), so an upgrade takes effect and kernel log records reach this agent
            // rather than the ring buffer of the one before.
            let program = self
                .ebpf
                .program(name)
                .ok_or(BpfError::MissingProgram(name))?;
            let updated = program
                .fd()
                .map_err(|e| io::Error::other(e.to_string()))
                .and_then(|fd| link_update(old.as_fd(), fd.as_fd()));
            match updated {
                Ok(()) => return Ok(LinkOutcome::Kept),
                // A link detached behind our back (ENOLINK), or no link at all: replace it.
                Err(e) => log::warn!("{}: replacing the pinned link: {e}", path.display()),
            }
        }
        let fd_link: FdLink = if name == SOCK_OPS_PROGRAM {
            let program = sock_ops_program(&mut self.ebpf)?;
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(program_err(name))?;
            let link = program.take_link(id).map_err(program_err(name))?;
            FdLink::try_from(link).map_err(|e| pin_err(io::Error::other(e)))?
        } else {
            let program = sock_addr_program(&mut self.ebpf, name)?;
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(program_err(name))?;
            let link = program.take_link(id).map_err(program_err(name))?;
            FdLink::try_from(link).map_err(|e| pin_err(io::Error::other(e)))?
        };
        let outcome = match old {
            // The new link runs before the old one goes, so there is no moment without the
            // hook (running both for an instant is harmless: a redirected connect targets
            // loopback, which connect4/6 leave alone).
            Some(old) => {
                let _ = link_detach(old.as_fd());
                std::fs::remove_file(path).map_err(pin_err)?;
                LinkOutcome::Replaced
            }
            None => LinkOutcome::Attached,
        };
        // Dropping the pinned link closes our fd; the pin keeps the program attached.
        fd_link
            .pin(path)
            .map_err(|e| pin_err(io::Error::other(e)))?;
        Ok(outcome)
    }
}
