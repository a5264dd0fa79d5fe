package jepsenlite

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
)

// connOwner returns the pid, among pids, of the process that owns the
// dialing end of c, a connection the proxy accepted on loopback; 0 when
// none does (the process exited, or c is not IPv4 loopback).
//
// This is how a per-node proxy tells which node a peer connection comes
// from without any change to kvd: every node dials peer j at the same
// advertised address (the cluster map has one address per node), and the
// source port is ephemeral. The kernel knows: /proc/net/tcp lists the
// dialer's socket (local = c's remote address) with its inode, and
// /proc/PID/fd of the owning process links to socket:[inode].
func connOwner(c net.Conn, pids []int) int {
	ra, ok1 := c.RemoteAddr().(*net.TCPAddr)
	la, ok2 := c.LocalAddr().(*net.TCPAddr)
	if !ok1 || !ok2 || ra.IP.To4() == nil || la.IP.To4() == nil {
		return 0
	}
	inode := socketInode(procAddr(ra), procAddr(la))
	if inode == "" {
		return 0
	}
	want := "socket:[" + inode + "]"
	for _, pid := range pids {
		dir := fmt.Sprintf("/proc/%d/fd", pid)
		ents, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, e := range ents {
			if l, err := os.Readlink(dir + "/" + e.Name()); err == nil && l == want {
				return pid
			}
		}
	}
	return 0
}

// procAddr formats a TCP address as /proc/net/tcp does: the IPv4 address
// as a little-endian 32-bit hex word, the port as big-endian hex.
func procAddr(a *net.TCPAddr) string {
	ip := a.IP.To4()
	return fmt.Sprintf("%02X%02X%02X%02X:%04X", ip[3], ip[2], ip[1], ip[0], a.Port)
}

// socketInode finds the inode of the socket with the given local and
// remote addresses in /proc/net/tcp, or "".
func socketInode(local, remote string) string {
	f, err := os.Open("/proc/net/tcp")
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 10 || fs[1] != local || fs[2] != remote {
			continue
		}
		if _, err := strconv.ParseUint(fs[9], 10, 64); err == nil && fs[9] != "0" {
			return fs[9]
		}
	}
	return ""
}
