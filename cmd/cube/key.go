package main

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/cubesandbox/cube/internal/store"
)

// withStore opens the configured store, runs f with it and closes it.
func withStore(cmd *cobra.Command, f func(ctx context.Context, st *store.Store) error) error {
	ctx := cmd.Context()
	cfg, err := loadConfig()
	if err != nil {
		return err
	}
	st, err := store.Open(ctx, cfg.DataDir, cfg.DatabaseURL)
	if err != nil {
		return err
	}
	defer st.Close()
	return f(ctx, st)
}

func init() {
	addCommand(func() *cobra.Command {
		c := &cobra.Command{Use: "key", Short: "Manage API keys (e2b_<hex>, stored hashed)"}
		var name string
		create := &cobra.Command{
			Use:   "create",
			Short: "Create an API key and print it on stdout (it is shown only once)",
			Args:  cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				return withStore(cmd, func(ctx context.Context, st *store.Store) error {
					key, rec, err := st.CreateAPIKey(ctx, name)
					if err != nil {
						return err
					}
					fmt.Fprintln(cmd.OutOrStdout(), key)
					fmt.Fprintf(cmd.ErrOrStderr(), "created key %s (%s)\n", rec.ID, rec.Name)
					return nil
				})
			},
		}
		create.Flags().StringVar(&name, "name", "", "a name for the key")
		list := &cobra.Command{
			Use:   "list",
			Short: "List API keys",
			Args:  cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				return withStore(cmd, func(ctx context.Context, st *store.Store) error {
					keys, err := st.ListAPIKeys(ctx)
					if err != nil {
						return err
					}
					w := tabwriter.NewWriter(cmd.OutOrStdout(), 2, 4, 2, ' ', 0)
					fmt.Fprintln(w, "ID\tNAME\tPREFIX\tCREATED\tLAST USED\tSTATE")
					for _, k := range keys {
						state := "active"
						if k.Revoked() {
							state = "revoked " + k.RevokedAt.Format(time.RFC3339)
						}
						last := "-"
						if !k.LastUsedAt.IsZero() {
							last = k.LastUsedAt.Format(time.RFC3339)
						}
						fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", k.ID, k.Name, k.Prefix, k.CreatedAt.Format(time.RFC3339), last, state)
					}
					return w.Flush()
				})
			},
		}
		revoke := &cobra.Command{
			Use:   "revoke ID|KEY",
			Short: "Revoke an API key (by id or by the key itself)",
			Args:  cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				return withStore(cmd, func(ctx context.Context, st *store.Store) error {
					if err := st.RevokeAPIKey(ctx, args[0]); err != nil {
						return err
					}
					fmt.Fprintln(cmd.ErrOrStderr(), "revoked")
					return nil
				})
			},
		}
		c.AddCommand(create, list, revoke)
		return c
	})
}
