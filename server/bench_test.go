package server

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkPut measures acknowledged puts through the Go client against an
// in-process 3-node cluster (real gRPC on loopback, real bbolt with fsync):
// one writer (latency per op) and 64 concurrent writers (throughput).
func BenchmarkPut(b *testing.B) {
	for _, writers := range []int{1, 64} {
		b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) {
			c := newBenchCluster(b)
			cl := c.client()
			value := make([]byte, 256)
			var seq atomic.Int64
			b.SetParallelism(writers)
			if writers == 1 {
				b.SetParallelism(1)
			}
			b.ResetTimer()
			runWriters(b, writers, func() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				k := fmt.Sprintf("bench/%08d", seq.Add(1))
				if _, err := cl.Put(ctx, []byte(k), value); err != nil {
					b.Error(err)
				}
			})
		})
	}
}

// runWriters runs op b.N times from n goroutines.
func runWriters(b *testing.B, n int, op func()) {
	var left atomic.Int64
	left.Store(int64(b.N))
	done := make(chan struct{})
	for i := 0; i < n; i++ {
		go func() {
			defer func() { done <- struct{}{} }()
			for left.Add(-1) >= 0 {
				op()
			}
		}()
	}
	for i := 0; i < n; i++ {
		<-done
	}
}
