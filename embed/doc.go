// Package embed runs a kvd node inside a Go program.
//
//	n, err := embed.Start(ctx, embed.Config{DataDir: dir})
//	if err != nil { ... }
//	defer n.Close()
//	<-n.Ready()
//	_, err = n.Client().Put(ctx, []byte("k"), []byte("v"))
//
// A Config with only DataDir is a single-node store that opens no TCP
// port: its client reaches it in memory. Every field left zero takes the
// default kvd's flag of the same name has (DefaultConfig). Listen
// addresses, an initial cluster or a join make the node a member of a
// cluster, as the kvd command does; cmd/kvd is itself a thin wrapper over
// this package, so the binary and an embedder run the same code.
//
// On a cluster with auth enabled the node's client needs a user:
// Start(ctx, cfg, WithClientAuth(user, password)).
package embed
