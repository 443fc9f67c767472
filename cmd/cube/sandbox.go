package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	apiclient "github.com/cubesandbox/cube/internal/client"
	"github.com/cubesandbox/cube/internal/errs"
)

// apiFlags are the connection flags of commands that talk to the API.
type apiFlags struct {
	url, sandboxURL, key string
}

func (f *apiFlags) bind(c *cobra.Command) {
	c.PersistentFlags().StringVar(&f.url, "api-url", "", "API URL (default $E2B_API_URL or http://localhost:3000)")
	c.PersistentFlags().StringVar(&f.sandboxURL, "sandbox-url", "", "data-plane URL (default $E2B_SANDBOX_URL or the API URL)")
	c.PersistentFlags().StringVar(&f.key, "api-key", "", "API key (default $E2B_API_KEY, else the data dir's default key)")
}

func (f *apiFlags) client() (*apiclient.Client, error) {
	url := firstNonEmpty(f.url, os.Getenv("E2B_API_URL"), "http://localhost:3000")
	surl := firstNonEmpty(f.sandboxURL, os.Getenv("E2B_SANDBOX_URL"), url)
	key := firstNonEmpty(f.key, os.Getenv("E2B_API_KEY"))
	if key == "" {
		if cfg, err := loadConfig(); err == nil {
			if b, err := os.ReadFile(filepath.Join(cfg.DataDir, "default-api-key")); err == nil {
				key = strings.TrimSpace(string(b))
			}
		}
	}
	if key == "" {
		return nil, errs.E(errs.Unauthenticated, "no API key: set E2B_API_KEY or pass --api-key (cube key create makes one)")
	}
	return apiclient.New(url, surl, key), nil
}

func firstNonEmpty(v ...string) string {
	for _, s := range v {
		if s != "" {
			return s
		}
	}
	return ""
}

func init() {
	addCommand(func() *cobra.Command {
		var af apiFlags
		c := &cobra.Command{Use: "sandbox", Aliases: []string{"sb"}, Short: "Manage sandboxes through the API (for people without an SDK)"}
		af.bind(c)
		ls := &cobra.Command{
			Use: "ls", Short: "List sandboxes", Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				cl, err := af.client()
				if err != nil {
					return err
				}
				l, err := cl.List(cmd.Context())
				if err != nil {
					return err
				}
				w := tabwriter.NewWriter(cmd.OutOrStdout(), 2, 4, 2, ' ', 0)
				fmt.Fprintln(w, "ID\tTEMPLATE\tSTATE\tSTARTED\tENDS\tMETADATA")
				for _, s := range l {
					var md []string
					for k, v := range s.Metadata {
						md = append(md, k+"="+v)
					}
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", s.SandboxID, firstNonEmpty(s.Alias, s.TemplateID), s.State,
						s.StartedAt.Local().Format(time.DateTime), s.EndAt.Local().Format(time.DateTime), strings.Join(md, ","))
				}
				return w.Flush()
			},
		}
		var timeout int
		var md, envs []string
		create := &cobra.Command{
			Use: "create [TEMPLATE]", Short: "Create a sandbox (default template base) and print its id", Args: cobra.MaximumNArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				cl, err := af.client()
				if err != nil {
					return err
				}
				tpl := "base"
				if len(args) == 1 {
					tpl = args[0]
				}
				o := apiclient.CreateOptions{Timeout: timeout, Metadata: kv(md), EnvVars: kv(envs)}
				sb, err := cl.Create(cmd.Context(), tpl, o)
				if err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), sb.SandboxID)
				return nil
			},
		}
		create.Flags().IntVar(&timeout, "timeout", 0, "seconds until the sandbox is killed (default 300)")
		create.Flags().StringArrayVar(&md, "metadata", nil, "K=V metadata (repeatable)")
		create.Flags().StringArrayVar(&envs, "env", nil, "K=V environment variable (repeatable)")
		exec := &cobra.Command{
			Use: "exec ID COMMAND...", Short: "Run a shell command in a sandbox; exits with its exit code", Args: cobra.MinimumNArgs(2),
			RunE: func(cmd *cobra.Command, args []string) error {
				cl, err := af.client()
				if err != nil {
					return err
				}
				info, err := cl.Get(cmd.Context(), args[0])
				if err != nil {
					return err
				}
				res, err := cl.Exec(cmd.Context(), args[0], info.EnvdAccessToken, strings.Join(args[1:], " "), cmd.OutOrStdout(), cmd.ErrOrStderr())
				if err != nil {
					return err
				}
				if res.ExitCode != 0 {
					os.Exit(res.ExitCode)
				}
				return nil
			},
		}
		simple := func(use, short string, f func(cl *apiclient.Client, cmd *cobra.Command, id string) error) *cobra.Command {
			return &cobra.Command{Use: use + " ID...", Short: short, Args: cobra.MinimumNArgs(1),
				RunE: func(cmd *cobra.Command, args []string) error {
					cl, err := af.client()
					if err != nil {
						return err
					}
					for _, id := range args {
						if err := f(cl, cmd, id); err != nil {
							return fmt.Errorf("%s: %w", id, err)
						}
					}
					return nil
				}}
		}
		kill := simple("kill", "Kill sandboxes", func(cl *apiclient.Client, cmd *cobra.Command, id string) error { return cl.Kill(cmd.Context(), id) })
		pause := simple("pause", "Pause sandboxes", func(cl *apiclient.Client, cmd *cobra.Command, id string) error { return cl.Pause(cmd.Context(), id) })
		resume := simple("resume", "Resume (connect to) sandboxes", func(cl *apiclient.Client, cmd *cobra.Command, id string) error {
			_, err := cl.Resume(cmd.Context(), id, timeout)
			return err
		})
		resume.Flags().IntVar(&timeout, "timeout", 0, "new timeout in seconds (default 300)")
		c.AddCommand(ls, create, exec, kill, pause, resume)
		return c
	})
}

func kv(pairs []string) map[string]string {
	if len(pairs) == 0 {
		return nil
	}
	m := map[string]string{}
	for _, p := range pairs {
		k, v, _ := strings.Cut(p, "=")
		m[k] = v
	}
	return m
}
